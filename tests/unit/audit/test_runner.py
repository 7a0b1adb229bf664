"""The audit runner and its reports, in-process against the real digits target."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from purifier import evaluation as ev
from purifier.attacks import Coverage, Family
from purifier.audit.report import markdown, text_table
from purifier.audit.results import Best, Report
from purifier.audit.runner import AttackOutcome, AuditConfig, run_audit, shadow_fallbacks
from purifier.cli import main
from purifier.defenses import IdentityDefense
from purifier.defenses.base import Defense
from purifier.errors import ConfigError
from purifier.models.access import InProcessTarget

FAST = {"n_shadows": 2, "shadow_epochs": 40, "n_boot": 20, "progress": False}


class Flatten(Defense):
    """Label-keeping and deterministic: p^(1/4) renormalized."""

    name = "test_flatten"

    def _transform(self, p, inputs):
        q = p ** 0.25
        return q / q.sum(axis=1, keepdims=True), None


@pytest.fixture(scope="module")
def audits(digits_target):
    attacks = ("gap", "mentr", "nn_label", "lira_online")
    plain = run_audit(digits_target, InProcessTarget(digits_target), AuditConfig(attacks, **FAST), "none")
    defended = run_audit(digits_target, InProcessTarget(digits_target, Flatten()), AuditConfig(attacks, **FAST),
                         "none", baseline=InProcessTarget(digits_target))
    return plain, defended


def test_report_numbers_follow_from_scores(audits):
    plain, _ = audits
    r, m = plain.report, plain.membership
    assert r.n_members == r.n_nonmembers == 400
    u = r.utility
    floor = r.gap_floor.balanced_accuracy
    assert floor == pytest.approx(0.5 + (u.member_accuracy - u.nonmember_accuracy) / 2)
    assert r.attacks["gap"].balanced_accuracy == pytest.approx(floor)
    assert u.cost is None  # no baseline given
    for name, o in plain.outcomes.items():
        a = r.attacks[name]
        assert a.ranking.auc == pytest.approx(ev.roc_auc(o.scores, m))
        # the reported balanced accuracy is the attack's own shadow-fitted threshold, never the oracle
        assert a.balanced_accuracy == pytest.approx(ev.balanced_accuracy(o.scores >= o.threshold, m))
        assert a.balanced_accuracy <= a.oracle_balanced_accuracy + 1e-12
        t = ev.tpr_at_fpr(o.scores, m, 0.01)
        got = a.ranking.tpr_1pct
        assert (got.tpr, got.fpr, got.negatives, got.measurable) == (t.tpr, t.fpr, 400, True)
        assert got.ci95[0] <= got.tpr <= got.ci95[1] and a.ranking.tpr_01pct.ci95 is not None
        assert a.queries == 800
    text = json.dumps(r.to_json())  # JSON-able, and read back whole
    assert Report.from_json(json.loads(text)) == r
    sh = r.shadows
    assert sh.trained + sh.from_cache == 2 and sh.executor["executor"] == "local"
    assert sh.cache["enabled"] and 0 <= sh.in_shadows_per_record["min"] <= sh.in_shadows_per_record["max"] <= 2
    # 2 shadows: LiRA falls back to one global variance, and the report says so
    assert set(sh.fallbacks) == {"lira_online"} and "2 shadows < 16" in sh.fallbacks["lira_online"]
    table = text_table(r)
    assert "shadow models: " in table and "from the cache" in table
    assert "label-only floor" in table and "nn_label" in table and "not measurable (400 neg.)" in table
    assert table.count("Too few shadow models for full strength: with 2, lira_online ran a weaker variant") == 1
    assert "| lira_online | confidence |" in markdown(r)


def test_undefended_digits_leaks_beyond_the_floor(audits):
    r = audits[0].report
    best = max(("mentr", "nn_label", "lira_online"), key=lambda n: r.attacks[n].ranking.auc)
    # the digits MLP generalizes well (non-members 97% right, mostly near-certain): leakage is
    # modest, and these fast shadows (2 models, 40 epochs) are weaker than the benchmark's 4 x 150
    # (benchmarks/audit_targets.py: AUC 0.588 [0.548, 0.627] against a floor of 0.515)
    a = r.attacks[best]
    assert a.ranking.auc > r.gap_floor.auc + 0.02, a
    names = ("mentr", "nn_label", "lira_online")
    assert max(r.attacks[n].balanced_accuracy for n in names) > r.gap_floor.balanced_accuracy
    # 2 shadows give no record 2 IN and 2 OUT shadows: lira_online runs offline and the report says so
    assert r.attacks["lira_online"].details["variant"] == "offline"
    assert any(line.startswith("Too few shadow models") and "lira_online" in line for line in r.verdict.lines)
    # the label-only floor here is the gap attack (the only label-only attack run)
    gap = r.attacks["gap"].ranking
    assert r.label_only_floor.auc == Best("gap", gap.auc, gap.auc_ci95, False)


def test_label_preserving_defense_leaves_the_gap_attack_unchanged(audits):
    plain, defended = audits
    np.testing.assert_array_equal(plain.outcomes["gap"].scores, defended.outcomes["gap"].scores)
    gap = plain.report.attacks["gap"]
    assert gap == replace(defended.report.attacks["gap"], seconds=gap.seconds)
    assert plain.report.gap_floor == defended.report.gap_floor
    cost = defended.report.utility.cost
    assert cost.argmax_agreement == 1.0 and 0 < cost.l1_nonmembers.mean <= cost.l1_nonmembers.max <= 2
    # the flattening does move the confidence attacks' thresholds off (non-adaptive attacker)
    assert defended.report.attacks["mentr"].balanced_accuracy < plain.report.attacks["mentr"].balanced_accuracy


def test_adaptive_needs_defense_name_and_class_count_must_match(digits_target):
    with pytest.raises(ConfigError, match="--defense-name"):
        run_audit(digits_target, InProcessTarget(digits_target), AuditConfig(("adaptive_nn",), **FAST))
    access = InProcessTarget(digits_target)
    access.n_classes = 3
    with pytest.raises(ConfigError, match="class-count mismatch"):
        run_audit(digits_target, access, AuditConfig(("gap",), **FAST))


def test_cli_in_process_with_a_defense_dir(digits_target, tmp_path, capsys):
    d = IdentityDefense()
    d.n_classes, d.model_id = 10, digits_target.model_id
    d.save(tmp_path / "none")
    rc = main(["audit", "--in-process", "--defense-dir", str(tmp_path / "none"), "--target",
               str(digits_target.directory), "--out", str(tmp_path / "rep"), "--attacks", "gap", "adaptive_mentr",
               "--shadows", "1", "--shadow-epochs", "20", "--bootstrap", "10", "--quiet"])
    assert rc == 0
    r = Report.read(tmp_path / "rep")
    assert r.defense == "none" and r.source.endpoint == "in-process"
    assert r.attacks["adaptive_mentr"].family == "adaptive"
    assert r.utility.cost.argmax_agreement == 1.0 and r.utility.cost.l1_nonmembers.max < 1e-6
    # in process the model without --defense-dir is the "before": the same attacks but the adaptive one
    assert r.baseline is not None and r.baseline.undefended and set(r.baseline.attacks) == {"gap"}
    assert "adaptive_mentr" in capsys.readouterr().out


def test_cli_refuses_a_defense_fitted_for_another_model(digits_target, tmp_path, capsys):
    from purifier.defenses import FitData

    X, y = digits_target.role("reference")
    other = np.full((len(X), 10), 0.1)  # "another model": same inputs and classes, other answers
    IdentityDefense().fit(FitData(other, other, X, X, y, y, model_id="")).save(tmp_path / "d")
    rc = main(["audit", "--in-process", "--defense-dir", str(tmp_path / "d"), "--target",
               str(digits_target.directory), "--out", str(tmp_path / "rep"), "--attacks", "gap", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert re.search(r"was fitted for another model: the model's answers to the \d+ probe inputs differ", err)
    assert not (tmp_path / "rep").exists()


def test_audit_from_record_files_with_a_recipe_and_assumptions(digits_target, tmp_path):
    from purifier.audit.data import AuditData
    from purifier.data.records import Records

    roles = [Records(*digits_target.role(r), r) for r in ("eval_members", "eval_nonmembers", "attacker")]
    data = AuditData(*roles, n_classes=10, model_family="random_forest")
    data.check_disjoint()
    audit = run_audit(data, InProcessTarget(digits_target), AuditConfig(("gap", "mentr"), n_boot=10, n_shadows=2,
                                                                         progress=False, shadow_model="logistic"))
    r = audit.report
    assert r.dataset == "records" and r.shadows.recipe == "logistic"
    a = r.assumptions
    assert a.recipe_matches_target_family is False and a.attacker_pool == len(roles[2])
    assert any("is not the target's model family 'random_forest'" in w for w in a.warnings)
    assert any("not measurable" in w for w in a.warnings)  # 400 non-members
    # the shadows are logistic regressions: their label oracle answers like their stored outputs
    np.testing.assert_array_equal(audit.shadows.labels_fn(0)(roles[2].X), audit.shadows.pool_probs[0].argmax(1))
    md = markdown(r)
    assert md.index("## What the audit assumed") < md.index("| attack |") and "**warning:**" in md


@pytest.mark.parametrize("case,message", [
    ("exists", "--out: .* already exists; choose a new directory or pass --force"),
    ("pool-overlap", "--attacker-pool .* and --nonmembers .* share 400 record"),
    ("member-overlap", "--members .* and --nonmembers .* share 400 record"),
    ("missing", "--members .*nope.npz: file does not exist"),
    ("recipe", "unknown recipe 'svm'"),
    ("no-records", "give the records: --members FILE --nonmembers FILE --attacker-pool FILE"),
])
def test_cli_bad_record_files_are_one_line(digits_target, tmp_path, capsys, case, message):
    import re

    from purifier.data.records import save_records

    for role, name in (("eval_members", "m"), ("eval_nonmembers", "n"), ("attacker", "p")):
        save_records(tmp_path / f"{name}.npz", *digits_target.role(role))
    files = {"--members": "m", "--nonmembers": "n", "--attacker-pool": "p"}
    if case == "pool-overlap":
        files["--attacker-pool"] = "n"
    elif case == "member-overlap":
        files["--members"] = "n"
    elif case == "missing":
        files["--members"] = "nope"
    args = ["audit", "--model", str(digits_target.onnx_path), "--out", str(tmp_path / "rep"), "--quiet",
            *(x for flag, name in files.items() for x in (flag, str(tmp_path / f"{name}.npz")))]
    if case == "exists":
        (tmp_path / "rep").mkdir()
    elif case == "recipe":
        args += ["--shadow-model", "svm"]
    elif case == "no-records":
        args = args[:6]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert (tmp_path / "rep").exists() == (case == "exists")


def test_shadow_fallbacks_name_only_choices_forced_by_too_few_shadows():
    def outcome(name, **details):
        return AttackOutcome(name, Family.CONFIDENCE, Coverage.CONFIDENCE, np.zeros(2), np.zeros(2, bool), 0.0, 2, 0.1,
                             details)

    outcomes = [outcome("lira_online", variance="fixed (global)", variance_reason="4 shadows < 16: one global variance"),
                outcome("lira_offline", variance="fixed (global)", variance_reason="chosen by the caller"),
                outcome("rmia", variant="offline", variant_reason="offline: only 3% of records have >= 2 IN and OUT"),
                outcome("label_calibrated", variant="offline", variant_reason="offline chosen by the caller",
                        threshold_from="fixed rule (one shadow: nothing to hold out)"),
                outcome("lira_big", variance="per-example", variance_reason="64 shadows >= 16"),
                outcome("mentr")]
    got = shadow_fallbacks({o.name: o for o in outcomes})
    assert got == {"lira_online": "4 shadows < 16: one global variance",
                   "rmia": "offline: only 3% of records have >= 2 IN and OUT",
                   "label_calibrated": "threshold: fixed rule (one shadow: nothing to hold out)"}


def test_attacks_fitted_once_score_a_later_audit_like_freshly_fitted_ones(digits_target, audits):
    plain, _ = audits
    access = InProcessTarget(digits_target, Flatten())
    config = AuditConfig(("gap", "mentr", "nn_label", "lira_online"), **FAST)
    fresh = run_audit(digits_target, access, config, "none", shadows=plain.shadows)
    reused = run_audit(digits_target, access, config, "none", shadows=plain.shadows, fitted=plain.fitted)
    assert set(plain.fitted) == set(config.attacks)
    assert all(reused.fitted[n] is plain.fitted[n] for n in config.attacks)
    for name in config.attacks:
        np.testing.assert_array_equal(reused.outcomes[name].scores, fresh.outcomes[name].scores)
        assert reused.report.attacks[name].ranking == fresh.report.attacks[name].ranking


def test_before_and_after_run_the_same_attacks_with_the_same_shadows(digits_target, audits):
    from purifier.audit.html import ReportPage, headline_rows
    from purifier.audit.runner import run_before_after

    attacks = ("gap", "mentr", "nn_label", "lira_online")
    before, after = run_before_after(digits_target, InProcessTarget(digits_target, Flatten()),
                                     InProcessTarget(digits_target), AuditConfig(attacks, **FAST), "test_flatten")
    r = after.report
    assert r.baseline == before.report and before.report.undefended and r.defense == "test_flatten"
    assert after.shadows is before.shadows and all(after.fitted[n] is before.fitted[n] for n in attacks)
    # the "before" is the plain audit's: same shadows (from the cache), same attacks, same numbers
    plain = audits[0].report
    assert {n: a.ranking for n, a in before.report.attacks.items()} == {n: a.ranking for n, a in plain.attacks.items()}
    # the defended side: its cost to users measured against the undefended answers, labels kept
    assert r.utility.cost.argmax_agreement == 1.0 and r.utility.cost.l1_nonmembers.mean > 0
    np.testing.assert_array_equal(before.outcomes["gap"].scores, after.outcomes["gap"].scores)
    # one report: both columns, both sets of curves, read back whole
    rows = headline_rows(ReportPage(r))
    assert rows[0][1][0] == f"{before.report.strongest().auc.value:.3f}" != "not audited"
    assert rows[0][2][0] == f"{r.strongest().auc.value:.3f}"
    assert set(before.report.curves) >= {b.attack for b in before.report.headline()}
    assert Report.from_json(json.loads(json.dumps(r.to_json()))) == r
    assert not any(line.startswith("No undefended baseline") for line in r.verdict.lines)


def test_an_earlier_report_on_other_records_is_refused(digits_target, audits):
    from purifier.audit.data import AuditData
    from purifier.data.records import Records

    roles = [Records(*digits_target.role(r), r) for r in ("eval_members", "eval_nonmembers", "attacker")]
    fewer = AuditData(Records(roles[0].X[:300], roles[0].y[:300], "m"), *roles[1:], n_classes=10)
    with pytest.raises(ConfigError, match="--baseline: that report was audited on other evaluation records"):
        run_audit(fewer, InProcessTarget(digits_target), AuditConfig(("gap",), **FAST), "x", before=audits[0].report)
    with pytest.raises(ConfigError, match="not the undefended model"):
        run_audit(digits_target, InProcessTarget(digits_target), AuditConfig(("gap",), **FAST), "x",
                  before=replace(audits[0].report, defense="memguard"))


def test_an_older_report_json_fails_in_one_line(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"defense": "none", "attacks": {}}))
    with pytest.raises(ConfigError, match=r"report.json: schema version 1 is not supported \(this purifier reads "
                                          r"version 2\); audit again with this purifier"):
        Report.read(tmp_path)


def test_quick_audits_with_four_shadows_and_says_what_it_gives_up_once(digits_target, tmp_path, capsys):
    from purifier.attacks.shadow import DEFAULT_SHADOWS, QUICK_SHADOWS
    from purifier.audit.command import shadow_count
    from purifier.cli import build_parser

    args = ["audit", "--in-process", "--target", str(digits_target.directory), "--out", str(tmp_path / "rep")]
    assert shadow_count(build_parser().parse_args(args)) == DEFAULT_SHADOWS == 32
    assert main([*args, "--quick", "--shadows", "8", "--quiet"]) == 2
    assert "--quick means --shadows 4" in capsys.readouterr().err
    rc = main([*args, "--quick", "--attacks", "gap", "lira_online", "--shadow-epochs", "20", "--bootstrap", "10"])
    assert rc == 0
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["shadows"]["n"] == QUICK_SHADOWS
    assert capsys.readouterr().err.count("quick audit: 4 shadow models instead of 32") == 1
