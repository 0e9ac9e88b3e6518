"""Console forms of the inference pages."""

from __future__ import annotations

from django import forms


class BudgetLimitForm(forms.Form):
    """A budget's limit in USD, dollars and cents."""

    limit = forms.DecimalField(
        label="Limit (USD)", min_value=0, max_digits=14, decimal_places=2,
        error_messages={"invalid": "Enter the limit as a number of dollars, e.g. 25 or 12.50.",
                        "min_value": "The limit must be zero or more (remove the budget for no limit).",
                        "max_decimal_places": "Enter the limit in dollars and cents: at most 2 decimal places."},
        widget=forms.TextInput(attrs={"inputmode": "decimal", "autocomplete": "off"}))
