"""What an audit assumed: data sizes per role, the shadow recipe, the attacker's knowledge, and
warnings when the evaluation is too small for the figures it reports.

Membership inference figures only mean something relative to the threat model behind them
(Carlini et al. 2022, "Membership Inference Attacks From First Principles", section 3: report
TPR at low FPR, and only where the number of negatives supports it). This block sits at the top
of report.md, so nobody reads a number without its assumptions.
"""

from __future__ import annotations

from purifier.audit.results import Assumptions, Report

# Fewer non-members than this and TPR at 0.1% FPR rests on less than one false positive.
MIN_NONMEMBERS_LOW_FPR = 1000
MAX_AUC_CI_HALF_WIDTH = 0.03


def assumptions(report: Report, data, defense_name: str | None) -> Assumptions:
    """What a finished report (its `assumptions` not yet filled) assumed, with its `AuditData`."""
    sh = report.shadows
    recipe, family = sh.recipe, data.model_family
    same = None if family is None else recipe == family
    rows = len(data.pool) + report.n_members + report.n_nonmembers
    per_shadow = data.train_size if data.train_size else f"about {rows // 2}"
    knowledge = (
        "black-box queries: confidence vectors for the confidence attacks, predicted labels only for the "
        "label-only attacks",
        "the evaluation records' features and true labels, not their membership",
        f"{len(data.pool)} records of its own from the training data's distribution, disjoint from the "
        "evaluation records (the shadow models' training data)",
        f"{sh.n} shadow model(s) trained with recipe {recipe!r}, {per_shadow} rows each"
        + (f" (the target's training-set size {data.train_size})" if data.train_size else
           " (half of pool + candidates: the target's training-set size is unknown)"),
        (f"the defense algorithm ({defense_name}) for the adaptive attacks, not its secret or fitted state"
         if defense_name else "no defense algorithm: adaptive attacks not run"),
    )
    warnings = []
    negatives = report.n_nonmembers
    if negatives < MIN_NONMEMBERS_LOW_FPR:
        warnings.append(f"only {negatives} non-members: TPR at 0.1% FPR is not measurable (needs >= "
                        f"{MIN_NONMEMBERS_LOW_FPR}); read TPR at 1% FPR"
                        + ("" if negatives >= 100 else ", which is not measurable either (needs >= 100)"))
    half = max(((a.ranking.auc_ci95[1] - a.ranking.auc_ci95[0]) / 2 for a in report.attacks.values()), default=0.0)
    if half > MAX_AUC_CI_HALF_WIDTH:
        warnings.append(f"AUC 95% intervals are up to +-{half:.3f} wide with {report.n_members} members and "
                        f"{negatives} non-members: differences below that are noise; audit more records")
    if same is False:
        warnings.append(f"shadow recipe {recipe!r} is not the target's model family {family!r}: thresholds fitted "
                        f"on shadows may misjudge the target (use --shadow-model {family} if it is a recipe)")
    elif same is None:
        warnings.append("the target's model family is unknown: the shadow recipe may not mimic it "
                        "(name it with --target-family)")
    return Assumptions(report.n_members, negatives, len(data.pool), data.train_size, recipe, family, same,
                       knowledge, tuple(warnings))


def markdown_lines(a: Assumptions | None) -> list[str]:
    """The "What the audit assumed" section of report.md."""
    if a is None:
        return []
    train = a.target_training_set
    md = ["## What the audit assumed", "",
          f"- records: {a.evaluation_members} evaluation members, {a.evaluation_nonmembers} evaluation "
          f"non-members, {a.attacker_pool} in the attacker's pool; target training set "
          f"{train if train else 'unknown'}",
          f"- shadow recipe `{a.shadow_recipe}`; target model family `{a.target_family or 'unknown'}`",
          "- the attacker has: " + "; ".join(a.attacker_knows)]
    md += [f"- **warning:** {w}" for w in a.warnings]
    return [*md, ""]
