"""What a pretraining run needs besides the optimizer: model presets (``models``), token data
(``data``), the run diagnostics (``diagnostics``), and the pretraining job's parts: its input
checks (``run_inputs``), what a resume may change (``run_settings``), what its checkpoints hold
and the one resume path (``run_state``), its logs (``run_logs``) and its processes (``run_processes``).

The submodules are imported on use: ``models`` loads transformers, which a data-only tool can do without.
"""
