"""The attacker harness: target access (`access`), the audit runner (`runner`), reports
(`report`) and the `purifier audit` command (`command`). Submodules are imported on use so the
CLI's parser stays cheap to build."""
