"""The README stays true: every setting the code reads is in its configuration table,
with the default the code uses."""
import re
from dataclasses import fields
from pathlib import Path

from palimpsest.config import Settings, load_settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_documented_with_its_default(tmp_path):
    rows = dict(re.findall(r"^\| `(PALIMPSEST_[A-Z0-9_]+)` \| ([^|]+) \|", README, re.M))
    defaults = load_settings({"PALIMPSEST_DATA_DIR": str(tmp_path)})
    for field in fields(Settings):
        name = f"PALIMPSEST_{field.name.upper()}"
        assert name in rows, f"{name} is missing from the README's configuration table"
        value = getattr(defaults, field.name)
        if isinstance(value, int) and not isinstance(value, bool):
            assert rows[name].strip() == f"`{value}`", f"{name}: README says {rows[name].strip()}, code {value}"
