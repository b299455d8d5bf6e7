"""Progress output of the long commands (cli.progress.bar): in a log (stderr not a terminal) one
plain line per item with the ETA; with --quiet nothing; stdout untouched (it carries --json)."""

from accelerando.cli.progress import bar


def test_bar_lines_in_a_log_and_silence_when_quiet(capsys):
    with bar(3, "sweep") as b:
        b(0, 3, "first", None)
        b(1, 3, "second", 90.0)
        b.step("third")
        b.at(3, 3, "done", line=False)
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.splitlines() == ["[1/3] first  (ETA -)", "[2/3] second  (ETA 1.5 min)", "[2/3] sweep: third"]
    with bar(2, "sweep", quiet=True) as b:
        b(0, 2, "x", 1.0)
        b.step("y")
        b.at(2, 2, "z")
    assert capsys.readouterr() == ("", "")
