"""The training engine: one modality's trainer (training), joint / serial / parallel (strategies),
torchrun ranks (distributed), checkpoints and run directories (checkpoint, rundir), the settings
(config), progress bars and records, and the flows that tie them into a run (flows)."""
