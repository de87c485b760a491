"""The named API as a gradio_client caller sees it (``view_api``): endpoint names, each parameter's
name, label, component, type and default, and each output's label, component and type."""
from __future__ import annotations

import json
from pathlib import Path

SNAPSHOT = Path(__file__).parent / "data" / "api_snapshot.json"


def api_shape(info: dict) -> dict:
    """The comparable part of ``Blocks.get_api_info()`` / ``Client.view_api(return_format="dict")``."""
    def parameter(p: dict) -> dict:
        return {"name": p.get("parameter_name"), "label": p.get("label"), "component": p.get("component"),
                "type": (p.get("python_type") or {}).get("type"), "has_default": p.get("parameter_has_default", False),
                "default": p.get("parameter_default")}

    def output(r: dict) -> dict:
        return {"label": r.get("label"), "component": r.get("component"),
                "type": (r.get("python_type") or {}).get("type")}

    return {name: {"parameters": [parameter(p) for p in endpoint["parameters"]],
                   "returns": [output(r) for r in endpoint["returns"]]}
            for name, endpoint in sorted(info["named_endpoints"].items())}


def read_snapshot() -> dict:
    return json.loads(SNAPSHOT.read_text())
