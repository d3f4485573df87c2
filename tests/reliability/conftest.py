"""The reliability suite's shared plumbing: ``figures``, where tests record what they
measured (recovery times, counts), printed at the end of the run and, when
``PALIMPSEST_FIGURES_OUT`` names a file, written there as JSON (docs/reliability.md
quotes them)."""
import json
import os

import pytest

_FIGURES = {}


@pytest.fixture
def figures(request):
    """``figures["name"] = value``: kept under this test's name."""
    return _FIGURES.setdefault(request.node.name, {})


def pytest_terminal_summary(terminalreporter):
    recorded = {test: values for test, values in _FIGURES.items() if values}
    if not recorded:
        return
    terminalreporter.section("reliability figures")
    for test, values in recorded.items():
        terminalreporter.write_line(f"{test}: {json.dumps(values)}")
    out = os.environ.get("PALIMPSEST_FIGURES_OUT")
    if out:
        previous = json.loads(open(out).read()) if os.path.exists(out) else {}
        with open(out, "w") as f:
            json.dump({**previous, **recorded}, f, indent=2, sort_keys=True)
