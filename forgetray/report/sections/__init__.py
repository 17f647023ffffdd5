"""The report's sections, one module per stage or study of a run (the map is in `forgetray.report`):
each renders its part of `report.html` from a `RunView` and says in its docstring which files it
reads; `forgetray.report.html.SECTIONS` orders them."""
