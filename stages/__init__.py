"""Stage entry points, models, and the pure algorithm and reward modules. Never imports Prefect."""

# Modules that never shape a stage's output (logging and progress, processes and signals, checkpoint files, the
# stage command, the thread-safe `ast.parse`): never a stage's DVC dependency, so editing them makes nothing stale.
BOOKKEEPING = frozenset({"stages.tracking", "stages.processes", "stages.checkpoint", "stages.runner",
                          "stages.python_ast"})
