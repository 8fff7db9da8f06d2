"""Execute every API workflow once against a running ComfyUI, with small settings (CPU smoke run).

    python workflows/smoke_run.py --server 127.0.0.1:8188 [--only NAME] [--full]

Without --full, the heavy widgets are shrunk so a CPU finishes in minutes: 3 erasure steps, batch 2,
2 exemplars, 64 px, 2 sampling steps (the graphs, node types and links are exactly the shipped ones).
Prints one line per workflow (status, seconds, outputs or the error) and a JSON summary at the end.
A workflow passes only if it ran without error and every output node (SaveImage, Save Erasure,
Evaluate Erasure, ...) produced output; "incomplete" names the output nodes that did not.
Needs the models the workflows name (stand-ins with those names work; the FLUX templates need real
FLUX.1 files) and, for erase_object_sd15, images in ComfyUI's input/exemplars/dog.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
SMALL = {
    "BiErasingErase": {"steps": 3, "batch_size": 2, "cache_size": 2, "xt_steps": 3, "resolution": 64},
    "BiErasingGenerateExemplars": {"count": 2, "steps": 2, "resolution": 64},
    "BiErasingCompareGrid": {"samples_per_prompt": 1, "steps": 2, "resolution": 64},
    "BiErasingLoadExemplars": {"size": 64, "max_images": 2},
    "BiErasingAttack": {"steps": 2, "batch_size": 2},
    "KSampler": {"steps": 2},
    "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
    "EmptySD3LatentImage": {"width": 64, "height": 64, "batch_size": 1},
}


def shrink(prompt: dict) -> dict:
    out = copy.deepcopy(prompt)
    for node in out.values():
        for k, v in SMALL.get(node["class_type"], {}).items():
            if k in node["inputs"] and not isinstance(node["inputs"][k], list):
                node["inputs"][k] = v
    return out


def _call(server: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(f"http://{server}{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


def output_nodes(prompt: dict, object_info: dict) -> list[str]:
    return [nid for nid, node in prompt.items() if object_info.get(node["class_type"], {}).get("output_node")]


def run_one(server: str, prompt: dict, timeout: float, expected: list[str] = ()) -> dict:
    t0 = time.time()
    try:
        pid = _call(server, "/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]
    except urllib.error.HTTPError as e:
        return {"status": "rejected", "seconds": round(time.time() - t0, 1), "error": e.read().decode()[:1500]}
    while time.time() - t0 < timeout:
        h = _call(server, f"/history/{pid}").get(pid)
        if h and h.get("status", {}).get("completed") is not None and (h["status"]["completed"] or
                                                                         h["status"]["status_str"] == "error"):
            st = h["status"]
            err = [m[1] for m in st.get("messages", []) if m[0] == "execution_error"]
            files = [f.get("filename") for o in h.get("outputs", {}).values() for f in o.get("images", [])]
            texts = [t[:200] for o in h.get("outputs", {}).values() for t in o.get("text", [])]
            silent = [f"{n} ({prompt[n]['class_type']})" for n in expected
                      if not any(h.get("outputs", {}).get(n, {}).values())]
            status = "incomplete" if st["status_str"] == "success" and silent else st["status_str"]
            return {"status": status, "seconds": round(time.time() - t0, 1), "prompt_id": pid,
                    "images": files, "texts": texts, "no_output": silent,
                    "error": (f"{err[0].get('node_type')}: {err[0].get('exception_message', '')[:500]}" if err else None)}
        time.sleep(1.0)
    return {"status": "timeout", "seconds": round(time.time() - t0, 1), "prompt_id": pid}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default="127.0.0.1:8188")
    p.add_argument("--only", default="", help="comma-separated workflow names, run in this order")
    p.add_argument("--reverse", action="store_true", help="run in reverse name order")
    p.add_argument("--full", action="store_true", help="run with the shipped settings")
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args()
    names = sorted(f.stem for f in (HERE / "api").glob("*.json"))
    if args.only:
        names = [n for n in args.only.split(",") if n in names]
    names = names[::-1] if args.reverse else names
    results = {}
    object_info = _call(args.server, "/object_info")
    for name in names:
        prompt = json.loads((HERE / "api" / f"{name}.json").read_text())
        prompt = prompt if args.full else shrink(prompt)
        r = run_one(args.server, prompt, args.timeout, output_nodes(prompt, object_info))
        results[name] = r
        print(f"{name}: {r['status']} in {r['seconds']} s" + (f" - {r['error']}" if r.get("error") else "")
              + (f" - no output from {', '.join(r['no_output'])}" if r.get("no_output") else "")
              + (f" - images {r['images']}" if r.get("images") else ""), flush=True)
    print(json.dumps(results))
    return 0 if all(r["status"] == "success" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
