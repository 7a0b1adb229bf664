"""The attacker harness: model access (`access`, and the flags naming a model: `model_flags`),
the records an audit runs on (`data`), the audit runner (`runner`), reports (`report`, with
`assumptions`) and the `purifier audit` command (`command`). Submodules are imported on use so
the CLI's parser stays cheap to build."""
