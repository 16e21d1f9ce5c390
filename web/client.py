"""`kiln`: the command-line client. It speaks only HTTP (requests) and reads configs/; no flask, no torch.

URL and token come from --url/--token, else KILN_URL/KILN_TOKEN, else
http://127.0.0.1:8000 and the admin token `make run` wrote to var/admin-token.
Server errors print as one line on stderr and exit 1.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import zipfile
from pathlib import Path

import requests
import yaml

from configs import ConfigError, apply_overrides
from configs.names import TERMINAL_STATES

DEFAULT_URL = "http://127.0.0.1:8000"


class CliError(Exception):
    """A failure to report as one line on stderr."""


def default_token() -> str | None:
    """KILN_TOKEN, else the admin token file under KILN_HOME (default ./var) if readable."""
    if os.environ.get("KILN_TOKEN"):
        return os.environ["KILN_TOKEN"]
    path = Path(os.environ.get("KILN_HOME", "var")) / "admin-token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class Client:
    """A thin HTTP client over Kiln's API; raises CliError with the server's message."""

    def __init__(self, url: str, token: str | None, timeout: float = 60.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def request(self, method: str, path: str, *, ok=(200, 201, 202), **kw) -> requests.Response:
        try:
            resp = self.session.request(method, self.url + path, timeout=kw.pop("timeout", self.timeout), **kw)
        except requests.ConnectionError:
            raise CliError(f"cannot reach {self.url} (is the server running? `make run` starts one; "
                           "--url or KILN_URL points elsewhere)") from None
        except requests.Timeout:
            raise CliError(f"{method} {path}: no answer from {self.url} within {self.timeout:g} s") from None
        if resp.status_code not in ok:
            raise CliError(describe_error(resp))
        return resp

    def json(self, method: str, path: str, **kw):
        return self.request(method, path, **kw).json()


def describe_error(resp: requests.Response) -> str:
    """'HTTP 401 unauthorized: invalid or revoked token' from the JSON error shape (or the raw body)."""
    try:
        err = resp.json()["error"]
        text = f"{err.get('code', 'error')}: {err.get('message', '')}"
        details = err.get("details")
        if isinstance(details, list) and details and all(isinstance(d, dict) for d in details):
            text += " [" + "; ".join(f"{d.get('field')}: {d.get('message')}" for d in details) + "]"
    except (ValueError, KeyError, TypeError):
        text = (resp.text or resp.reason or "").strip().splitlines()[0][:200] if resp.text else resp.reason
    return f"HTTP {resp.status_code} {' '.join(str(text).split())}"


# ------------------------------------------------------------------ formatting
def fmt_duration(seconds) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


def fmt_num(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def progress_line(job: dict, width: int = 24) -> str:
    """'running  epoch 2/3 [#########-------]  45.0%  loss 0.532  acc 0.812  ETA 00:12'."""
    p = job.get("progress") or {}
    latest = (job.get("metrics") or {}).get("latest") or {}
    pct = float(p.get("percent") or 0.0)
    filled = int(round(width * min(100.0, pct) / 100))
    loss = latest.get("train_loss", latest.get("val_loss"))
    return (f"{job.get('status', '?'):<10} epoch {p.get('epoch') or 0}/{p.get('epochs') or '?'} "
            f"[{'#' * filled}{'-' * (width - filled)}] {pct:5.1f}%  loss {fmt_num(loss)}  "
            f"acc {fmt_num(latest.get('val_accuracy'))}  ETA {fmt_duration(p.get('eta_s'))}")


# ------------------------------------------------------------------ commands
def follow_job(c: Client, job_id: str, interval: float = 1.0, out=sys.stdout) -> dict:
    """Poll a job until it finishes, drawing a progress bar (a line per change when not a TTY)."""
    tty, last = out.isatty(), None
    while True:
        job = c.json("GET", f"/v1/jobs/{job_id}")
        line = progress_line(job)
        if line != last:
            out.write(("\r" + line + "\033[K") if tty else line + "\n")
            out.flush()
            last = line
        if job.get("status") in TERMINAL_STATES:
            if tty:
                out.write("\n")
            return job
        time.sleep(interval)


def report_final(job: dict) -> int:
    metrics = job.get("metrics") or {}
    print(f"job {job['id']} {job['status']}")
    for label in ("latest", "best"):
        if metrics.get(label):
            print(f"  {label}: " + "  ".join(f"{k} {fmt_num(v)}" for k, v in metrics[label].items()))
    if job.get("error"):
        print(f"  error: {job['error']}", file=sys.stderr)
    return 0 if job["status"] == "succeeded" else 1


def cmd_submit(c: Client, a) -> int:
    try:
        config = yaml.safe_load(Path(a.config).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CliError(f"cannot read {a.config}: {exc}".splitlines()[0]) from None
    try:
        config = apply_overrides(config, a.set or [])
    except ConfigError as exc:
        raise CliError(f"--set: {exc}; e.g. --set training.epochs=3") from None
    job = c.json("POST", "/v1/jobs", json={"kind": a.kind, "config": config})
    print(f"submitted {job['kind']} job {job['id']} ({job['status']})")
    if not a.follow:
        return 0
    return report_final(follow_job(c, job["id"]))


def rerun_body(job: dict) -> dict:
    """The POST /v1/jobs body that submits ``job`` again: its kind, its stored (fully resolved) config
    and its priority when the server records one."""
    body = {"kind": job["kind"], "config": job["config"]}
    if job.get("priority") is not None:
        body["priority"] = job["priority"]
    return body


def cmd_rerun(c: Client, a) -> int:
    job = c.json("GET", f"/v1/jobs/{a.id}")
    new = c.json("POST", "/v1/jobs", json=rerun_body(job))
    print(new["id"] if a.quiet else f"submitted {new['kind']} job {new['id']} ({new['status']}), a rerun of {a.id}")
    if not a.follow:
        return 0
    return report_final(follow_job(c, new["id"]))


def cmd_jobs(c: Client, a) -> int:
    params = {k: v for k, v in (("status", a.status), ("kind", a.kind), ("limit", a.limit)) if v}
    data = c.json("GET", "/v1/jobs", params=params)
    print(f"{'ID':<34} {'KIND':<8} {'STATUS':<11} {'PROGRESS':>8}  {'ETA':>8}  CREATED")
    for job in data.get("jobs", []):
        p = job.get("progress") or {}
        print(f"{job['id']:<34} {job['kind']:<8} {job['status']:<11} {float(p.get('percent') or 0):7.1f}%  "
              f"{fmt_duration(p.get('eta_s')) if job['status'] == 'running' else '':>8}  {job.get('created_at')}")
    print(f"{len(data.get('jobs', []))} of {data.get('total', '?')} jobs")
    return 0


def cmd_status(c: Client, a) -> int:
    job = c.json("GET", f"/v1/jobs/{a.id}")
    print(json.dumps(job, indent=2) if a.json else progress_line(job))
    if not a.json and job.get("error"):
        print(f"error: {job['error']}")
    return 0


def cmd_logs(c: Client, a) -> int:
    offset = 0
    while True:
        resp = c.request("GET", f"/v1/jobs/{a.id}/logs", params={"offset": offset})
        sys.stdout.write(resp.content.decode("utf-8", "replace"))
        sys.stdout.flush()
        offset = int(resp.headers.get("X-Next-Offset", offset + len(resp.content)))
        if not a.follow:
            return 0
        if not resp.content and resp.headers.get("X-Job-Finished") == "true":
            return 0
        if not resp.content:
            time.sleep(1.0)


def cmd_cancel(c: Client, a) -> int:
    job = c.json("POST", f"/v1/jobs/{a.id}/cancel")
    print(f"job {job['id']} {job['status']}")
    return 0


def cmd_artifacts(c: Client, a) -> int:
    data = c.json("GET", f"/v1/jobs/{a.id}/artifacts")
    items = data.get("artifacts", data) if isinstance(data, dict) else data
    for item in items:
        print(f"{item['size']:>12}  {item.get('sha256', '')[:16]}  {item['name']}")
    return 0


def cmd_download(c: Client, a) -> int:
    target = Path(a.output or Path(a.path).name)
    resp = c.request("GET", f"/v1/jobs/{a.id}/artifacts/{a.path.lstrip('/')}", stream=True)
    tmp = target.with_name(target.name + ".part")
    with open(tmp, "wb") as f:
        for chunk in resp.iter_content(1 << 20):
            f.write(chunk)
    tmp.replace(target)
    print(f"saved {target} ({target.stat().st_size} bytes)")
    return 0


def zip_dir(folder: Path) -> bytes:
    """An in-memory zip of a folder (ImageFolder layout: one subfolder per class)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return buf.getvalue()


def cmd_datasets(c: Client, a) -> int:
    if a.action == "list":
        for d in c.json("GET", "/v1/datasets").get("datasets", []):
            print(f"{d['id']:<34} {d.get('name') or '':<20} classes {len(d.get('classes') or [])}  "
                  f"images {d.get('num_images', d.get('count', '?'))}")
        return 0
    src = Path(a.path)
    if src.is_dir():
        data, filename = zip_dir(src), src.name + ".zip"
    elif src.is_file():
        data, filename = src.read_bytes(), src.name
    else:
        raise CliError(f"{src}: no such file or directory")
    form = {"name": a.name} if a.name else {}
    ds = c.json("POST", "/v1/datasets", files={"file": (filename, data, "application/zip")}, data=form,
                timeout=600)
    print(json.dumps(ds, indent=2))
    return 0


def cmd_models(c: Client, a) -> int:
    if a.action == "list":
        for m in c.json("GET", "/v1/models").get("models", []):
            aliases = " ".join(f"{k}->{v}" for k, v in (m.get("aliases") or {}).items())
            print(f"{m['name']:<24} versions {len(m.get('versions') or [])}  {aliases}")
        return 0
    if a.action == "register":
        body = {"name": a.name, "job_id": a.job, "checkpoint": a.checkpoint}
        version = c.json("POST", "/v1/models", json=body)
        print(f"registered {a.name} version {version.get('version')}")
        return 0
    result = c.json("PUT", f"/v1/models/{a.name}/aliases/{a.alias}", json={"version": a.version})
    print(f"{a.name}@{a.alias} -> version {a.version}" if result is not None else "")
    return 0


def cmd_predict(c: Client, a) -> int:
    files = []
    for name in a.images:
        try:
            files.append(("image", (Path(name).name, Path(name).read_bytes())))
        except OSError as exc:
            raise CliError(f"cannot read {name}: {exc.strerror}") from None
    params = {"top_k": a.top_k, **({"model": a.model} if a.model else {})}
    data = c.json("POST", "/predict", files=files, params=params)
    model = data.get("model") or {}
    for name, pred in zip(a.images, data.get("predictions", [])):
        top = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in pred.get("top_k", []))
        print(f"{name}: {pred['label']}  ({top})  [{model.get('name')}:{model.get('version')}]")
    return 0


def _add(sub, name: str, func, helptext: str, *arguments) -> None:
    """A subcommand with ``arguments`` as (flags, add_argument kwargs) pairs."""
    parser = sub.add_parser(name, help=helptext)
    for flags, kwargs in arguments:
        parser.add_argument(*flags, **kwargs)
    parser.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="Command-line client for a Kiln server.")
    p.add_argument("--url", default=os.environ.get("KILN_URL", DEFAULT_URL), help="server URL (KILN_URL)")
    p.add_argument("--token", default=None, help="API token (KILN_TOKEN, else var/admin-token)")
    sub = p.add_subparsers(dest="command", required=True)
    job_id = (["id"], {})
    _add(sub, "submit", cmd_submit, "submit a job from a YAML config", (["config"], {}),
         (["--set"], {"action": "append", "metavar": "KEY=VALUE", "help": "override a config value"}),
         (["--kind"], {"choices": ("train", "predict"), "default": "train"}),
         (["--follow", "-f"], {"action": "store_true", "help": "show progress until the job ends"}))
    _add(sub, "rerun", cmd_rerun, "submit a job again with the same config (and priority)", job_id,
         (["--follow", "-f"], {"action": "store_true", "help": "show progress until the new job ends"}),
         (["--quiet", "-q"], {"action": "store_true", "help": "print only the new job's id"}))
    _add(sub, "jobs", cmd_jobs, "list jobs", (["--status"], {}), (["--kind"], {}),
         (["--limit"], {"type": int, "default": 20}))
    _add(sub, "status", cmd_status, "show a job", job_id, (["--json"], {"action": "store_true"}))
    _add(sub, "cancel", cmd_cancel, "cancel a job", job_id)
    _add(sub, "artifacts", cmd_artifacts, "list a job's artifacts", job_id)
    _add(sub, "logs", cmd_logs, "print a job's log", job_id, (["-f", "--follow"], {"action": "store_true"}))
    _add(sub, "download", cmd_download, "download an artifact", job_id, (["path"], {}), (["-o", "--output"], {}))
    ds = sub.add_parser("datasets", help="upload or list datasets").add_subparsers(dest="action", required=True)
    _add(ds, "upload", cmd_datasets, "upload an ImageFolder directory (zipped for you) or a zip",
         (["path"], {}), (["--name"], {}))
    _add(ds, "list", cmd_datasets, "list datasets")
    ms = sub.add_parser("models", help="register models and move aliases").add_subparsers(dest="action",
                                                                                         required=True)
    _add(ms, "register", cmd_models, "register a job's checkpoint as a new version", (["name"], {}),
         (["job"], {}), (["--checkpoint"], {"choices": ("best", "last"), "default": "best"}))
    _add(ms, "alias", cmd_models, "point an alias at a version", (["name"], {}), (["alias"], {}),
         (["version"], {"type": int}))
    _add(ms, "list", cmd_models, "list models")
    _add(sub, "predict", cmd_predict, "classify images", (["images"], {"nargs": "+"}),
         (["--model"], {"help": "name, name:version or name@alias"}), (["--top-k"], {"type": int, "default": 5}))
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    client = Client(args.url, args.token or default_token())
    try:
        return args.func(client, args)
    except CliError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
