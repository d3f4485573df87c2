"""The API process never imports torch (nor the engine), even after serving requests."""
import json
import subprocess
import sys

from stack import embedded_stack

CHECK = """
import json, sys
from api import create_app
app = create_app(json.loads(sys.argv[1]))
client = app.test_client()
statuses = [client.get(path).status_code for path in ("/v1/healthz", "/v1/readyz", "/v1/openapi.json", "/docs")]
print(json.dumps({"statuses": statuses, "torch": "torch" in sys.modules,
                  "engine": sorted(m for m in sys.modules if m.split(".")[0] in ("rewriting", "demo"))}))
"""


def test_api_never_imports_torch(tmp_path):
    done = subprocess.run([sys.executable, "-c", CHECK, json.dumps(embedded_stack(tmp_path).settings.as_flask_config())],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"statuses": [200, 200, 200, 200], "torch": False, "engine": ["rewriting", "rewriting.errors", "rewriting.requests"]}


def test_cli_imports_neither_torch_nor_flask():
    """`palimpsest serve` only starts processes; it should not pay for torch."""
    done = subprocess.run([sys.executable, "-c", "import sys, palimpsest.cli; "
                           "print(sorted({'torch', 'flask'} & set(sys.modules)))"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
