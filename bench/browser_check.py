"""Opens every shipped template in ComfyUI's real frontend (headless Chromium) and checks it.

    python bench/browser_check.py --server 127.0.0.1:8188 [--chromium /usr/bin/chromium] [--live]

For each template served at /api/workflow_templates/<pack>/<name>.json (what the template browser
loads): no missing node types, no missing-node dialog, every combo value among the server's options,
every number within its limits, and the frontend re-serialises each node's widget values exactly as
the file has them (a shifted widget would not). Saves a screenshot per template under
bench/results/browser/, the template browser's own dialog, and with --live a screenshot of Erase
Concept's live preview during a run of the tiny template. Needs playwright (pip) and a Chromium.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "browser"
PACK = ROOT.name

CHECK_JS = """async (wf) => {
  const app = window.app;
  await app.loadGraphData(wf);
  await new Promise(r => setTimeout(r, 500));
  const problems = [];
  const registered = window.LiteGraph.registered_node_types;
  const byId = new Map(wf.nodes.map(n => [n.id, n]));
  for (const node of app.graph._nodes) {
    const where = `node ${node.id} (${node.type})`;
    if (!registered[node.type]) problems.push(`${where}: node type not registered (missing node)`);
    for (const w of node.widgets || []) {
      if (w.type === 'combo') {
        const vals = typeof w.options.values === 'function' ? w.options.values() : w.options.values;
        if (!vals || !vals.includes(w.value)) problems.push(`${where}: ${w.name}=${JSON.stringify(w.value)} not among ${vals ? vals.length : 0} options`);
      } else if (w.type === 'number') {
        const {min, max} = w.options || {};
        if ((min != null && w.value < min) || (max != null && w.value > max)) problems.push(`${where}: ${w.name}=${w.value} outside [${min}, ${max}]`);
      }
    }
    const saved = byId.get(node.id);
    if (saved && saved.widgets_values) {
      const now = node.serialize().widgets_values || [];
      if (JSON.stringify(now) !== JSON.stringify(saved.widgets_values))
        problems.push(`${where}: widget values ${JSON.stringify(now)} != file ${JSON.stringify(saved.widgets_values)}`);
    }
  }
  const dialogs = [...document.querySelectorAll('.p-dialog')].map(d => d.innerText.slice(0, 300));
  for (const d of dialogs) if (/missing|not found|error/i.test(d)) problems.push(`dialog: ${d}`);
  return {nodes: app.graph._nodes.length, problems, dialogs};
}"""


def get_json(server: str, route: str):
    with urllib.request.urlopen(f"http://{server}{route}", timeout=30) as r:
        return json.loads(r.read())


def http_status(url: str) -> int:
    try:
        return urllib.request.urlopen(url, timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code


def write_thumbnails(names, width: int = 512) -> None:
    """The graph as the frontend draws it, cropped to its drawn extent and shrunk: example_workflows/<name>.jpg."""
    import cv2
    import numpy as np

    for name in names:
        shot = cv2.imread(str(OUT / f"{name}.jpg"))
        h, w = shot.shape[:2]
        drawn = np.abs(shot.astype(int) - shot[h // 2, w - 5].astype(int)).sum(2) > 40  # canvas background
        drawn[:int(h * 0.08)] = drawn[:, :int(w * 0.05)] = False  # menus and the side bar
        drawn[int(h * 0.72):, int(w * 0.8):] = drawn[int(h * 0.9):] = False  # minimap, stats, zoom bar
        ys, xs = np.nonzero(drawn)
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        crop = shot[max(0, y0 - 12):y1 + 12, max(0, x0 - 12):x1 + 12]
        ch, cw = crop.shape[:2]
        if cw * 3 < ch * 4:  # pad to 4:3 with the canvas colour, centred
            pad = (ch * 4 // 3 - cw) // 2
            crop = cv2.copyMakeBorder(crop, 0, 0, pad, pad, cv2.BORDER_CONSTANT, value=[int(v) for v in shot[h // 2, w - 5]])
        else:
            pad = (cw * 3 // 4 - ch) // 2
            crop = cv2.copyMakeBorder(crop, pad, pad, 0, 0, cv2.BORDER_CONSTANT, value=[int(v) for v in shot[h // 2, w - 5]])
        small = cv2.resize(crop, (width, round(crop.shape[0] * width / crop.shape[1])), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(ROOT / "example_workflows" / f"{name}.jpg"), small, [cv2.IMWRITE_JPEG_QUALITY, 85])


def shot(page, path: Path) -> None:
    page.screenshot(path=str(path), type="jpeg", quality=80)


def close_dialogs(page) -> None:
    """A fresh frontend opens its template dialog on first load; close whatever dialog is open."""
    for _ in range(3):
        if not page.locator(".p-dialog").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(400)


def fit_view(page) -> None:
    close_dialogs(page)
    try:
        page.evaluate("window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    except Exception:  # noqa: BLE001  older frontends: the "." shortcut
        page.mouse.click(5, 400)
        page.keyboard.press(".")
    page.wait_for_timeout(800)


def main() -> int:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default="127.0.0.1:8188")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--pack", default=PACK, help="the pack's folder name in custom_nodes")
    ap.add_argument("--thumbnails", action="store_true",
                    help="write example_workflows/<name>.jpg (the template browser's thumbnails) from the screenshots")
    ap.add_argument("--live", action="store_true", help="also run the tiny template and capture the live preview")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    names = get_json(args.server, "/workflow_templates").get(args.pack, [])
    if not names:
        print(f"the server lists no templates for {args.pack}", file=sys.stderr)
        return 1
    report = {"server": args.server, "templates": {}}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        console = []
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"[:300]) if m.type == "error" else None)
        failed = []
        page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.goto(f"http://{args.server}/", wait_until="networkidle")
        page.wait_for_function("window.app && window.app.graph", timeout=60000)
        page.wait_for_timeout(3000)
        close_dialogs(page)
        try:  # the minimap would sit in every screenshot
            page.evaluate("window.app.extensionManager.setting.set('Comfy.Minimap.Visible', false)")
        except Exception:  # noqa: BLE001  frontends without a minimap setting
            pass
        report["frontend"] = page.evaluate("window.__COMFYUI_FRONTEND_VERSION__ || null")
        for name in sorted(names):
            wf = get_json(args.server, f"/api/workflow_templates/{args.pack}/{name}.json")
            close_dialogs(page)
            res = page.evaluate(CHECK_JS, wf)
            fit_view(page)
            shot(page, OUT / f"{name}.jpg")
            report["templates"][name] = res
            print(f"{name}: {res['nodes']} nodes, {len(res['problems'])} problems"
                  + "".join(f"\n  {p}" for p in res["problems"]), flush=True)
        if args.thumbnails:
            write_thumbnails(names)
        report["thumbnails_http"] = {n: http_status(f"http://{args.server}/api/workflow_templates/{args.pack}/{n}.jpg")
                                     for n in names}
        try:
            page.evaluate("window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
            page.wait_for_timeout(2500)
            page.get_by_text(args.pack, exact=False).first.click(timeout=5000)
            page.wait_for_timeout(2500)
            shot(page, OUT / "template_browser.jpg")
            report["template_browser"] = "template_browser.jpg"
            page.keyboard.press("Escape")
        except Exception as e:  # noqa: BLE001  the dialog's layout differs between frontend versions
            report["template_browser"] = f"not captured: {e}"[:300]
        if args.live:
            report["live"] = live_preview(page, args)
        report["console_errors"] = console
        report["failed_requests"] = failed
        browser.close()
    (OUT / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    bad = sum(len(r["problems"]) for r in report["templates"].values())
    print(f"{len(names)} templates, {bad} problems; screenshots in {OUT.relative_to(ROOT)}")
    return 1 if bad else 0


def live_preview(page, args) -> dict:
    """Queue the tiny template from the UI with a longer erasure and photograph Erase's live preview."""
    wf = get_json(args.server, f"/api/workflow_templates/{args.pack}/erase_lora_ksampler_tiny.json")
    for node in wf["nodes"]:
        if node["type"] == "BiErasingErase":
            node["title"] = "Erase Concept (live preview)"
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)
    page.evaluate("""() => { const n = window.app.graph._nodes.find(n => n.type === 'BiErasingErase');
        for (const w of n.widgets) { if (w.name === 'steps') w.value = 120; if (w.name === 'preview_every') w.value = 20;
            if (w.name === 'seed') w.value = Date.now() % 100000; }  // a new seed: ComfyUI would serve a cached result
        n.size = [Math.max(n.size[0], 480), n.size[1] + 520];  // room for the preview under the widgets
        const c = window.app.canvas; c.ds.scale = 1.0;
        c.ds.offset = [-n.pos[0] + 80, 900 - n.pos[1] - n.size[1]]; c.setDirty(true, true); }""")
    close_dialogs(page)
    page.evaluate("window.app.queuePrompt(0, 1)")
    shots = []
    t0 = time.time()
    while time.time() - t0 < 240:
        page.wait_for_timeout(4000)
        path = OUT / f"live_preview_{len(shots)}.jpg"
        shot(page, path)
        shots.append(path.name)
        queue = get_json(args.server, "/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            break
    return {"screenshots": shots, "seconds": round(time.time() - t0, 1)}


if __name__ == "__main__":
    sys.exit(main())
