"""Report sections that have their own module: each renders one study of a run for `report.html`."""
