from accelerando.cli import main

main()
