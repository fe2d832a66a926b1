"""One model's evaluation results (`darkhorse eval`), flattened into named figures for side-by-side
tables, JSON and the bar chart."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from darkhorse.eval.exact_match import ExactMatchReport
from darkhorse.eval.perplexity import TextScore
from darkhorse.eval.suite import SuiteRow, suite_score, suite_to_dict


@dataclass
class ModelEval:
    label: str  # the checkpoint or HF directory as given
    suite: list[SuiteRow] | None = None
    skills: ExactMatchReport | None = None
    text: TextScore | None = None
    tasks: dict[str, ExactMatchReport] = field(default_factory=dict)
    routing: dict[str, Any] | None = None  # MoE on tagged text: train.routing.held_out_isolation's report

    def accuracies(self) -> dict[str, float]:
        """Accuracy per task: each demo skill family, each task file (the bar chart's bars)."""
        bars = {}
        if self.skills is not None:
            bars.update({f"skill {name}": tally.accuracy for name, tally in self.skills.by_skill().items()})
        bars.update({f"task {name}": report.overall().accuracy for name, report in self.tasks.items()})
        return bars

    def metrics(self) -> dict[str, str]:
        """Every headline figure, formatted, by name (rows of the summary table)."""
        rows: dict[str, str] = {}
        if self.suite is not None:
            correct, checked = suite_score(self.suite)
            rows["suite: checkable prompts right"] = f"{correct}/{checked}"
            rows["suite: tokens/s"] = (
                f"{sum(r.tokens for r in self.suite) / max(1e-9, sum(r.seconds for r in self.suite)):.1f}"
            )
        if self.skills is not None:
            for name, tally in self.skills.by_skill().items():
                rows[f"skill {name}"] = f"{100 * tally.accuracy:.1f}% ({tally.correct}/{tally.total})"
        if self.text is not None:
            for name, tally in {
                "": self.text.overall,
                **{f" ({d})": t for d, t in self.text.by_domain.items()},
            }.items():
                bpb = tally.bits_per_byte
                rows[f"text{name}: bits/byte"] = "-" if bpb is None else f"{bpb:.4f}"
                rows[f"text{name}: perplexity"] = f"{tally.perplexity:.3f}"
        if (self.routing or {}).get("layers") and "rows" in self.routing:
            rows["routing read"] = f"documents in rows of {self.routing['rows']} sliding by {self.routing['stride']}"
        for layer in (self.routing or {}).get("layers", []):
            name = f"routing layer {layer['layer']}"
            rows[f"{name}: I(domain; expert)"] = (
                f"{layer['mutual_information_bits']:.3f} bits ({layer['share_of_domain_entropy']:.0%} of H(domain))"
            )
            if "token_group_accuracy" in layer:
                rows[f"{name}: group accuracy tokens / documents"] = (
                    f"{layer['token_group_accuracy']:.1%} / {layer['document_group_accuracy']:.1%}"
                )
        for name, report in self.tasks.items():
            overall = report.overall()
            rows[f"task {name}"] = f"{100 * overall.accuracy:.1f}% ({overall.correct}/{overall.total})"
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.label,
            "suite": suite_to_dict(self.suite) if self.suite is not None else None,
            "skills": self.skills.to_dict() if self.skills is not None else None,
            "text": self.text.to_dict() if self.text is not None else None,
            "routing": self.routing,
            "tasks": {name: report.to_dict() for name, report in self.tasks.items()},
        }
