"""The studio's FastAPI app: a static page at / and a JSON API under /api/ (module-level routes).

Every route takes the `Studio` from `request.app.state.studio` and calls one function of views, jobs,
compare or export; a UserError becomes `{"error": "<one line>"}` with its HTTP status, anything else a
one-line 500. With an API key, every /api/ request needs `Authorization: Bearer KEY` (as `start`'s /v1/).
"""

from __future__ import annotations

import hmac
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from llm_installer import store
from llm_installer.errors import UserError
from llm_installer.studio import paths, views
from llm_installer.studio.compare import Engines, stream_answer
from llm_installer.studio.jobs import Jobs, read_metrics

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD = (
    512 * 1024**2
)  # a small GGUF file fits; a data set far larger than this is not for a page
MAX_JSON_BODY = 1 << 20
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'"
)


@dataclass
class Studio:
    """What the routes share: the job list, the compare engine, the limits and the key."""

    jobs: Jobs
    engines: Engines = field(default_factory=Engines)
    api_key: str | None = None
    max_upload: int = DEFAULT_MAX_UPLOAD


def _studio(request: Request) -> Studio:
    return request.app.state.studio


async def _json(request: Request) -> dict[str, Any]:
    body = await request.body()
    if len(body) > MAX_JSON_BODY:
        raise UserError(f"request body too large: the limit is {MAX_JSON_BODY} bytes")
    import json

    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise UserError("the request body is not JSON") from None
    if not isinstance(data, dict):
        raise UserError("the request body must be a JSON object")
    return data


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message.splitlines()[0] if message else "error"}, status_code=status)


async def user_error(request: Request, exc: UserError) -> JSONResponse:
    return _error(getattr(exc, "status", 400), str(exc))


async def invalid_request(request: Request, exc: Any) -> JSONResponse:
    first = (exc.errors() or [{}])[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("path", "query", "body"))
    return _error(400, f"{where or 'request'}: {first.get('msg', 'invalid value')}")


async def http_error(request: Request, exc: Any) -> JSONResponse:
    message = "no such page or API route" if exc.status_code == 404 else str(exc.detail)
    return _error(exc.status_code, f"{request.url.path}: {message}")


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    from llm_installer.errors import is_disk_full

    if is_disk_full(exc):
        return _error(507, "the disk is full: free some space and try again")
    return _error(500, f"unexpected {type(exc).__name__}: {exc}")


# ----- Models -------------------------------------------------------------------------------------------
def info(request: Request) -> dict[str, Any]:
    from llm_installer import __version__

    return {
        "version": __version__,
        "models_dir": str(store.models_dir()),
        "max_upload": _studio(request).max_upload,
        "exports": [{"id": k, "label": v[0]} for k, v in exports().items()],
        "bundled": "smollm2-135m-instruct",
    }


def list_models() -> dict[str, Any]:
    return {"models": views.model_rows()}


def install_ref(ref: str) -> tuple[str, str]:
    """(what install() is given, default folder name) for the page's ref: bundled, Hub id or studio file."""
    from llm_installer.sources import bundled

    ref = (ref or "").strip()
    if ref == bundled.BUNDLED_NAME:
        return ref, ref
    if _HUB_ID.match(ref) and not ref.startswith(tuple(f"{r}/" for r in paths.roots())):
        if store.path_exists(ref):  # install() would take it for a folder of the server's working dir
            raise UserError(
                f"{ref}: a folder of that name exists where the studio runs; install it by Hub id elsewhere"
            )
        return ref, store.folder_name(ref)
    path = paths.resolve_data_path(ref)  # an uploaded .gguf file (or one in the models folder)
    if path.suffix.lower() != ".gguf":
        raise UserError(f"{ref}: the studio installs .gguf files, Hub ids and {bundled.BUNDLED_NAME}")
    return str(path), store.folder_name(path.stem)


def _expected_bytes(ref: str) -> int | None:
    """About how much the install writes (float32 weights of a GGUF, the Hub's file sizes), for the bar."""
    from llm_installer import fit

    try:
        info = fit.info_for_check(ref)
    except Exception:  # no estimate: the bar shows bytes written only
        return None
    if info.source in ("gguf", "bundled") and info.num_parameters:
        return int(info.num_parameters * 4)
    return int((info.model_size_gb or 0) * 1024**3) or None


async def install_model(request: Request) -> dict[str, Any]:
    body = await _json(request)
    ref, default = install_ref(str(body.get("ref") or ""))
    name = store.folder_name(str(body["name"])) if body.get("name") else default
    expected = await run_in_threadpool(_expected_bytes, ref)
    job = _studio(request).jobs.start_install(ref, name, expected, force=bool(body.get("force")))
    return job.public()


async def check_model(request: Request) -> dict[str, Any]:
    """The fit table for the bundled model, a Hub id, an installed model or an uploaded GGUF file."""
    body = await _json(request)
    ref = str(body.get("ref") or "").strip()
    if not ref:
        raise UserError("no model given: an installed name, a Hub id or smollm2-135m-instruct")
    if (store.models_dir() / ref).is_dir() and "/" not in ref:
        ref = str(paths.model_folder(ref).root)
    elif ref != "smollm2-135m-instruct":
        ref = install_ref(ref)[0]
    return await run_in_threadpool(views.check_model, ref)


def verify_model(name: str) -> dict[str, Any]:
    return views.verify_model(name)


async def remove_model(request: Request, name: str) -> dict[str, Any]:
    body = await _json(request)
    folder = paths.model_folder(name)
    if body.get("confirm") != name:
        raise UserError(f"removing {name} deletes its weights, adapter and runs: confirm with its name")
    busy = _studio(request).jobs.busy(name)
    if busy is not None:
        raise UserError(f"{name} has a {busy.kind} job {busy.state}; stop it before removing the model")
    _studio(request).engines.forget(name)
    removed = store.remove_model(folder.name)
    return {"removed": name, "path": str(removed)}


# ----- Data ---------------------------------------------------------------------------------------------
def list_data() -> dict[str, Any]:
    return {"files": paths.list_data_files()}


async def upload(request: Request, filename: str) -> dict[str, Any]:
    """PUT the raw file as the body; written to a temp file, renamed into uploads/ only when complete."""
    limit = _studio(request).max_upload
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise paths.UploadTooLarge(f"{filename}: the upload limit is {store.human_size(limit)}")
    tmp, final = paths.open_upload(filename)
    seen = 0
    try:
        with tmp.open("wb") as fh:
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise paths.UploadTooLarge(f"{filename}: the upload limit is {store.human_size(limit)}")
                fh.write(chunk)
        if seen == 0:
            raise UserError(f"{filename}: the file is empty")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": f"uploads/{final.name}", "bytes": seen}


async def inspect_data(request: Request) -> dict[str, Any]:
    body = await _json(request)
    data = body.get("data")
    data = [data] if isinstance(data, str) else data
    if not data or not all(isinstance(d, str) for d in data):
        raise UserError("pick a data file first (upload one or choose from the list)")
    msl = body.get("max_seq_length")
    return await run_in_threadpool(
        views.inspect_view, data, body.get("model") or None, int(msl) if msl else None
    )


# ----- Plan and Train -----------------------------------------------------------------------------------
async def plan(request: Request) -> dict[str, Any]:
    body = await _json(request)
    return await run_in_threadpool(views.plan_view, str(body.get("model") or ""), body)


async def train(request: Request) -> dict[str, Any]:
    """Check the plan first (a bad flag is a one-line answer now, not a failed job later), then queue."""
    body = await _json(request)
    folder = paths.model_folder(str(body.get("model") or ""))
    if not body.get("data") and not body.get("resume"):
        raise UserError("pick a data file first: training needs --data")
    await run_in_threadpool(_check_plan, folder, body)
    return _studio(request).jobs.queue_training(folder.name, views.cli_argv(folder.name, body)).public()


def _check_plan(folder: store.ModelFolder, body: dict[str, Any]) -> None:
    from llm_installer.train.plan import build_plan
    from llm_installer.train.trainer import resume_args

    build_plan(folder, resume_args(folder.runs_dir, views.train_args(body)))


def list_jobs(request: Request) -> dict[str, Any]:
    return {"jobs": _studio(request).jobs.listing()}


def job_detail(request: Request, job_id: int, since: int = 0) -> dict[str, Any]:
    job = _studio(request).jobs.get(job_id)
    out = job.public()
    out["metrics"] = read_metrics(job.run_dir, max(0, since))
    out["since"] = max(0, since)
    out["has_report"] = bool(job.run_dir and (job.run_dir / "report.md").is_file())
    if job.log_path and job.log_path.is_file():
        out["log_tail"] = job.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
    return out


def stop_job(request: Request, job_id: int) -> dict[str, Any]:
    return _studio(request).jobs.stop(job_id).public()


def _run_file(request: Request, job_id: int, name: str) -> Path:
    job = _studio(request).jobs.get(job_id)
    path = job.run_dir / name if job.run_dir else None
    if path is None or not path.is_file():
        raise UserError(f"job {job_id} has no {name} yet (it is written when the training ends)")
    return path


def job_report(request: Request, job_id: int) -> dict[str, Any]:
    return {"markdown": _run_file(request, job_id, "report.md").read_text(encoding="utf-8")}


def job_plot(request: Request, job_id: int) -> FileResponse:
    return FileResponse(_run_file(request, job_id, "loss.png"), media_type="image/png")


# ----- Compare ------------------------------------------------------------------------------------------
async def chat(request: Request) -> StreamingResponse:
    body = await _json(request)
    max_tokens = body.get("max_tokens", 64)
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= 1024:
        raise UserError("max_tokens: expected a whole number from 1 to 1024")
    lines = await run_in_threadpool(
        stream_answer,
        _studio(request).engines,
        str(body.get("model") or ""),
        str(body.get("prompt") or ""),
        bool(body.get("adapter")),
        max_tokens,
    )
    return StreamingResponse(lines, media_type="application/x-ndjson")


# ----- Export -------------------------------------------------------------------------------------------
def _export_merged(folder: store.ModelFolder) -> dict[str, Any]:
    from llm_installer import export as ex

    out = ex.export_merged(folder, paths.studio_dir() / "exports" / folder.name / "merged", force=True)
    return {"path": str(out), "message": f"merged weights in {out} (a plain transformers folder)"}


def _export_ollama(folder: store.ModelFolder) -> dict[str, Any]:
    from llm_installer import export as ex

    out = paths.studio_dir() / "exports" / folder.name / "ollama"
    modelfile, note = ex.export_ollama(folder, out, force=True)
    cmd = f"ollama create {folder.name.lower()} -f {modelfile}"
    return {"path": str(modelfile), "message": f"Modelfile written; run: {cmd}", "note": note}


def _export_vllm(folder: store.ModelFolder) -> dict[str, Any]:
    from llm_installer import export as ex

    script = ex.export_vllm(folder, paths.studio_dir() / "exports" / folder.name / "vllm", force=True)
    return {"path": str(script), "message": f"vLLM launch script: {script}\n{ex.vllm_command(folder)}"}


def _export_gguf(folder: store.ModelFolder, quant: str) -> dict[str, Any]:
    from llm_installer.gguf_export import export_gguf

    out = paths.studio_dir() / "exports" / folder.name / f"{folder.name}.{quant}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = export_gguf(folder, out, quant=quant, force=True)
    what = f"merged with {result.adapter}" if result.adapter else "base weights, no adapter"
    size = result.size / 2**20
    return {"path": str(result.path), "message": f"GGUF ({quant}, {what}, {size:.1f} MiB): {result.path}"}


def exports() -> dict[str, tuple[str, Any]]:
    """The Export step's entries, one line each: what the page lists and the function that writes it."""
    table: dict[str, tuple[str, Any]] = {
        "merged": ("merged weights (safetensors)", _export_merged),
        "ollama": ("Ollama Modelfile", _export_ollama),
        "vllm": ("vLLM launch script and command", _export_vllm),
        "gguf-q8_0": ("GGUF file, q8_0 (llama.cpp, Ollama)", lambda folder: _export_gguf(folder, "q8_0")),
        "gguf-f16": ("GGUF file, f16", lambda folder: _export_gguf(folder, "f16")),
    }
    return table


async def export_model(request: Request) -> dict[str, Any]:
    body = await _json(request)
    folder = paths.model_folder(str(body.get("model") or ""))
    entry = exports().get(str(body.get("kind") or ""))
    if entry is None:
        raise UserError(f"unknown export {body.get('kind')!r}; choose one of {', '.join(exports())}")
    if _studio(request).jobs.busy(folder.name):
        raise UserError(f"{folder.name} is training or installing; export when it has finished")
    return await run_in_threadpool(entry[1], folder)


# ----- the app ------------------------------------------------------------------------------------------
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": CSP})


ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/", index),
    ("GET", "/api/info", info),
    ("GET", "/api/models", list_models),
    ("POST", "/api/models/install", install_model),
    ("POST", "/api/models/check", check_model),
    ("POST", "/api/models/{name}/verify", verify_model),
    ("DELETE", "/api/models/{name}", remove_model),
    ("GET", "/api/data", list_data),
    ("PUT", "/api/uploads/{filename}", upload),
    ("POST", "/api/data/inspect", inspect_data),
    ("POST", "/api/plan", plan),
    ("POST", "/api/train", train),
    ("GET", "/api/jobs", list_jobs),
    ("GET", "/api/jobs/{job_id}", job_detail),
    ("POST", "/api/jobs/{job_id}/stop", stop_job),
    ("GET", "/api/jobs/{job_id}/report", job_report),
    ("GET", "/api/jobs/{job_id}/loss.png", job_plot),
    ("POST", "/api/chat", chat),
    ("POST", "/api/export", export_model),
]


class _Auth:
    """Pure ASGI middleware: with a key, every /api/ request needs `Authorization: Bearer KEY`."""

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.api_key and scope.get("path", "").startswith("/api/"):
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                msg = (
                    "this studio needs its API key: send 'Authorization: Bearer KEY'"
                    if not header
                    else "wrong API key"
                )
                return await _error(401, msg)(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(studio: Studio) -> FastAPI:
    """The app for one studio (tests build one per models folder)."""
    app = FastAPI(title="llm-installer studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.studio = studio
    for method, path, fn in ROUTES:
        app.add_api_route(path, fn, methods=[method])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_exception_handler(UserError, user_error)
    app.add_exception_handler(Exception, unexpected_error)
    from fastapi.exceptions import RequestValidationError

    app.add_exception_handler(RequestValidationError, invalid_request)
    from starlette.exceptions import HTTPException

    app.add_exception_handler(HTTPException, http_error)
    app.add_middleware(_Auth, api_key=studio.api_key)
    studio.jobs.on_trained.append(studio.engines.forget)
    return app


def new_studio(api_key: str | None = None, max_upload: int = DEFAULT_MAX_UPLOAD) -> Studio:
    """A studio over the current models folder (its uploads and job logs under `<models>/.studio/`)."""
    from llm_installer.studio.jobs import remove_upload_leftovers

    remove_upload_leftovers(paths.uploads_dir())
    return Studio(jobs=Jobs(paths.studio_dir() / "jobs"), api_key=api_key, max_upload=max_upload)
