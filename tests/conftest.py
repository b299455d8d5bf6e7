"""Shared test set-up.

LLM decoding in tests runs on the lean engine without torch.compile (seconds to minutes per graph on
2 cores): ``speculative_generate``'s default ``engine="auto"`` becomes ``"engine-eager"`` -- the
same engine code, eager. Tests of the compiled path ask for ``engine="engine"`` explicitly.
"""

import os

os.environ.setdefault("ACCELERANDO_ENGINE", "engine-eager")
