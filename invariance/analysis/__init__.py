"""Formulas over the computed rows: the finetuning metrics, the robustness link, plots."""
