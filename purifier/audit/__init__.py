"""The attacker harness: the flags naming a model (`model_flags`; model access itself is
`purifier.models.access`), the records an audit runs on (`data`), the audit runner (`runner`), its
typed results (`results`) and verdict (`verdict`), reports (`report`, `html`, with `assumptions`),
budget sweeps (`sweep`) and the `purifier audit` command (`command`). Submodules are imported on
use so the CLI's parser stays cheap to build."""
