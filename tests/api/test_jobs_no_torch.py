"""After serving real work (an upload, a validated job, a statistic, lists), the API process
still has neither torch nor any worker task module loaded: it only validates with the
engine's torch-free front end and sends tasks by name."""
import json
import subprocess
import sys

from stack import embedded_stack

CHECK = """
import io, json, sys
from api import create_app
from api.auth import create_key
from storage.db import session_scope
from storage.models import Model

app = create_app(json.loads(sys.argv[1]))
with session_scope(app.extensions["palimpsest_db"].session_factory) as session:
    key, _ = create_key(session, "t")
    layers = [{"name": "layer3", "kind": "conv", "param": "layer3.conv.weight", "key_channels": 8,
               "key_size": [8, 8], "value_channels": 8, "value_size": [8, 8]}]
    session.add(Model(id="mdl_x", tenant_id=None, name="demo", architecture="demo-gan", config={}, sha256="0" * 64,
                      size=1, object_key="shared/models/x/model.safetensors", layers=layers, status="ready"))
client = app.test_client()
headers = {"Authorization": "Bearer " + key}
edit = {"copy": {"seed": 1, "mask": [0, 0, 0.5, 0.5]}, "paste": {"seed": 2, "mask": [0.5, 0.5, 1, 1]}}
header = json.dumps({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}).encode()
checkpoint = len(header).to_bytes(8, "little") + header + b"abcd"
statuses = [
    client.post("/v1/jobs", json={"model": "mdl_x", "layer": "layer3", "request": edit}, headers=headers).status_code,
    client.post("/v1/models", data={"architecture": "demo-gan", "file": (io.BytesIO(checkpoint), "m.safetensors")},
                content_type="multipart/form-data", headers=headers).status_code,
    client.post("/v1/statistics", json={"model": "mdl_x", "layer": "layer3"}, headers=headers).status_code,
    client.get("/v1/jobs", headers=headers).status_code,
    client.get("/v1/models", headers=headers).status_code,
    client.get("/v1/statistics", headers=headers).status_code,
]
print(json.dumps({"statuses": statuses, "torch": "torch" in sys.modules,
                  "tasks": sorted(m for m in ("workers.jobs", "workers.statistics", "workers.models", "workers.tasks")
                                  if m in sys.modules)}))
"""


def test_serving_work_loads_no_torch_and_no_task_module(tmp_path, sqlite_url):
    config = {**embedded_stack(tmp_path).settings.as_flask_config(), "PALIMPSEST_DATABASE_URL": sqlite_url}
    done = subprocess.run([sys.executable, "-c", CHECK, json.dumps(config)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"statuses": [202, 202, 202, 200, 200, 200], "torch": False, "tasks": []}
