"""The learned method selector: workload features -> which acceleration method (and knobs) to use.

* ``features``  — what is known about a workload without running the candidates;
* ``table``     — history rows -> workloads x method configurations, quality constraints;
* ``models``    — the default selectors (pairwise, the quality-margin family) and the registry by name;
* ``baselines`` — the selectors they are compared with (SBS, kNN, ISAC, GBM / forest, ensemble);
* ``base``      — ``Selector``, ``Prediction`` and a family's training data (``FamilyData``);
* ``evaluate``  — leave-one-workload-out / leave-one-model-out evaluation (VBS, SBS, regret, gap);
* ``sweep``     — the workload grid run into the history;
* ``recommend`` — the ``accelerando recommend`` logic (with the bundled history, online learning).
"""

from .table import LOSSLESS, Constraint, PerfTable, build_table

__all__ = ["LOSSLESS", "Constraint", "PerfTable", "build_table"]
