"""`lorastack` commands that talk to a running server through the Python client.

``register(subparsers)`` adds them to the ``lorastack`` command. Every command takes
``--url``/``--api-key`` (else ``LORASTACK_URL``/``LORASTACK_API_KEY``, else what
``lorastack login`` saved) and ``--json``.

Exit codes: 0 success; 1 the job failed or was cancelled; 2 usage error; 3 server error or
server unreachable; 4 the server refused the request (4xx: not found, invalid, conflict);
130 interrupted (a followed job keeps running unless you chose to cancel it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lorastack.cli import display
from lorastack.client import Client, errors, models
from lorastack.client.config import save_login

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_SERVER = 3
EXIT_REFUSED = 4
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """exit codes:
  0    success
  1    the job failed or was cancelled
  2    usage error (bad arguments, no server configured)
  3    server error, or the server could not be reached
  4    the server refused the request (not found, invalid, conflict)
  130  interrupted (a followed job keeps running unless you cancelled it)"""

# Hyperparameter starting points (`train --preset`); `-p key=value` overrides any of them.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"max_steps": 20, "resolution": 64, "rank": 4, "learning_rate": 1e-3},
    "quick": {"max_steps": 300, "resolution": 512, "rank": 8, "learning_rate": 1e-4},
    "standard": {"max_steps": 1500, "resolution": 512, "rank": 16, "learning_rate": 1e-4},
}

Handler = Callable[[argparse.Namespace, Client], int]


class UsageError(Exception):
    """A command line that can't be run as given (exit 2)."""


# -- helpers ----------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("server")
    group.add_argument("--url", help="server URL (default: $LORASTACK_URL, then the login)")
    group.add_argument("--api-key", help="API key (default: $LORASTACK_API_KEY, then the login)")
    group.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return common


def _add(
    sub: Any,
    name: str,
    handler: Handler | None,
    *,
    help: str,
    example: str,
    common: argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=help[:1].upper() + help[1:] + ".",
        parents=[common],
        epilog=f"example:\n  {example}\n\n{EXIT_CODES_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if handler is not None:
        parser.set_defaults(func=_runner(handler))
    return parser


def _group(sub: Any, name: str, *, help: str, example: str) -> Any:
    """A command with subcommands (``lorastack datasets ...``)."""
    parser = sub.add_parser(
        name,
        help=help,
        description=help[:1].upper() + help[1:] + ".",
        epilog=f"example:\n  {example}\n\n{EXIT_CODES_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


def _runner(handler: Handler) -> Callable[[argparse.Namespace], None]:
    """Wrap a handler: make the client, map errors to exit codes, end with SystemExit."""

    def run(args: argparse.Namespace) -> None:
        raise SystemExit(run_command(handler, args))

    return run


def run_command(handler: Handler, args: argparse.Namespace) -> int:
    try:
        with Client(url=args.url, api_key=args.api_key, timeout=args.timeout) as client:
            return handler(args, client)
    except (errors.ConfigurationError, UsageError) as exc:
        return _fail(args, EXIT_USAGE, str(exc))
    except errors.JobFailed as exc:
        message = str(exc)
        _emit(args, exc.job, lambda: display.err(message))
        return EXIT_JOB_FAILED
    except errors.APIError as exc:
        code = EXIT_SERVER if exc.status >= 500 else EXIT_REFUSED
        problem = {"status": exc.status, **exc.problem}
        if args.json:
            print(json.dumps({"error": problem}))
        else:
            display.err(f"{exc.status} {exc.code}: {exc.detail}")
            for field_error in exc.errors:
                display.err(f"  {field_error.field}: {field_error.message}")
        return code
    except errors.LorastackError as exc:
        return _fail(args, EXIT_SERVER, str(exc))
    except KeyboardInterrupt:
        display.err("interrupted")
        return EXIT_INTERRUPTED


def _fail(args: argparse.Namespace, code: int, message: str) -> int:
    if args.json:
        print(json.dumps({"error": {"detail": message}}))
    else:
        display.err(message)
    return code


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _emit(args: argparse.Namespace, value: Any, human: Callable[[], None]) -> None:
    """Print ``value`` as JSON with ``--json``, else the human form."""
    if args.json:
        print(json.dumps(_jsonable(value), indent=2))
    else:
        human()


def _parse_value(text: str) -> Any:
    """``-p`` values: JSON when they parse as JSON (numbers, booleans, lists), else text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"-p {pair!r}: expected key=value (e.g. -p rank=8)")
        params[key.strip()] = _parse_value(value)
    return params


def parse_adapter(text: str) -> tuple[str, float]:
    """``name``, ``name@ref``, ``name@ref:0.8`` -> (ref, weight)."""
    ref, sep, weight = text.rpartition(":")
    if sep:
        try:
            return ref, float(weight)
        except ValueError:
            pass
    return text, 1.0


def split_ref(text: str) -> tuple[str, str]:
    """``name@version`` -> (name, version); ``name`` -> (name, "latest")."""
    name, _, version = text.partition("@")
    return name, version or "latest"


# -- login ------------------------------------------------------------------------------------


def cmd_login(args: argparse.Namespace) -> None:
    """Check the URL and key against the server, then save them (mode 0600)."""
    key = args.api_key
    if not key:
        key = display.ask_secret("API key: ") if sys.stdin.isatty() else sys.stdin.readline()
    key = key.strip()
    if not key:
        raise SystemExit(_fail(args, EXIT_USAGE, "no API key given"))
    code = run_command(lambda a, c: _check_login(a, c, key), _with(args, api_key=key))
    raise SystemExit(code)


def _check_login(args: argparse.Namespace, client: Client, key: str) -> int:
    client.datasets.list(limit=1)  # proves the URL and the key
    path = save_login(url=client.url, api_key=key)
    _emit(
        args,
        {"url": client.url, "config": str(path)},
        lambda: print(f"logged in to {client.url} (saved in {path})"),
    )
    return EXIT_OK


def _with(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


# -- datasets ---------------------------------------------------------------------------------


def cmd_datasets_upload(args: argparse.Namespace, client: Client) -> int:
    with display.transfer(f"uploading {args.path}", quiet=args.json) as on_progress:
        dataset = client.datasets.upload(
            args.path,
            name=args.name or Path(args.path).stem,
            caption=args.caption,
            trigger_word=args.trigger_word,
            on_progress=on_progress,
        )
    _emit(args, dataset, lambda: display.dataset(dataset))
    return EXIT_OK


def cmd_datasets_list(args: argparse.Namespace, client: Client) -> int:
    page = client.datasets.list(limit=args.limit)
    _emit(args, page, lambda: display.datasets(page.data))
    return EXIT_OK


def cmd_datasets_show(args: argparse.Namespace, client: Client) -> int:
    dataset = client.datasets.get(args.dataset_id)
    _emit(args, dataset, lambda: display.dataset(dataset))
    return EXIT_OK


def cmd_datasets_delete(args: argparse.Namespace, client: Client) -> int:
    client.datasets.delete(args.dataset_id)
    _emit(args, {"deleted": args.dataset_id}, lambda: print(f"deleted {args.dataset_id}"))
    return EXIT_OK


# -- training and jobs ------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace, client: Client) -> int:
    if args.preset and args.preset not in PRESETS:
        raise UsageError(f"--preset {args.preset}: one of {', '.join(PRESETS)}")
    hyperparameters = {**PRESETS.get(args.preset or "", {}), **parse_params(args.param)}
    dataset_id = args.dataset
    if Path(args.dataset).exists():  # a folder or zip: upload it first
        with display.transfer(f"uploading {args.dataset}", quiet=args.json) as on_progress:
            dataset_id = client.datasets.upload(
                args.dataset, name=args.name, on_progress=on_progress
            ).id
    created = client.jobs.create(
        dataset_id,
        args.name,
        base_model=args.base_model,
        hyperparameters=hyperparameters,
        dry_run=args.dry_run,
    )
    if isinstance(created, models.TrainingPlan) or not args.wait:
        _emit(args, created, lambda: display.created(created))
        return EXIT_OK
    if not args.json:
        display.err(f"job {created.id} queued; following it (Ctrl-C to detach or cancel)")
    return _follow(args, client, created.id)


def _follow(args: argparse.Namespace, client: Client, job_id: str) -> int:
    """Follow a job with a progress bar and its events until it ends."""
    with display.JobView(job_id, quiet=args.json) as view:
        try:
            job = client.jobs.wait(
                job_id,
                on_progress=view.progress,
                on_event=view.event,
                raise_on_failure=False,
            )
        except KeyboardInterrupt:
            view.stop()
            if display.confirm(f"cancel job {job_id}? [y/N] "):
                job = client.jobs.cancel(job_id)
                _emit(args, job, lambda: display.err(f"cancel requested for {job_id}"))
                return EXIT_JOB_FAILED
            display.err(f"detached; follow again with: lorastack jobs logs -f {job_id}")
            return EXIT_INTERRUPTED
    _emit(args, job, lambda: display.job(job))
    return EXIT_OK if job.status == "succeeded" else EXIT_JOB_FAILED


def cmd_jobs_list(args: argparse.Namespace, client: Client) -> int:
    page = client.jobs.list(kind=args.kind, status=args.status, limit=args.limit)
    _emit(args, page, lambda: display.jobs(page.data))
    return EXIT_OK


def cmd_jobs_show(args: argparse.Namespace, client: Client) -> int:
    job = client.jobs.get(args.job_id)
    _emit(args, job, lambda: display.job(job))
    return EXIT_OK


def cmd_jobs_logs(args: argparse.Namespace, client: Client) -> int:
    if args.follow:
        return _follow(args, client, args.job_id)
    events: list[models.JobEvent] = []
    after = 0
    while True:
        page = client.jobs.events(args.job_id, after=after, limit=1000)
        events.extend(page.data)
        if not page.has_more or not page.data:
            break
        after = page.data[-1].seq

    def human() -> None:
        for event in events:
            print(display.event_line(event))

    _emit(args, events, human)
    return EXIT_OK


def cmd_jobs_cancel(args: argparse.Namespace, client: Client) -> int:
    job = client.jobs.cancel(args.job_id)
    _emit(args, job, lambda: print(f"{job.id}: {job.status}"))
    return EXIT_OK


# -- generation -------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace, client: Client) -> int:
    result = client.generate(
        args.prompt,
        adapters=[parse_adapter(a) for a in args.adapter],
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        width=args.width,
        height=args.height,
        seed=args.seed,
        num_images=args.n,
        base_model=args.base_model,
    )
    output = Path(args.output)
    paths = []
    for index, image in enumerate(result.images):
        path = output if len(result.images) == 1 else output.with_stem(f"{output.stem}-{index}")
        paths.append(image.save(path))
    summary = {
        **result.generation.model_dump(mode="json", exclude={"images"}),
        "images": [
            {**i.info.model_dump(mode="json", exclude={"b64_json"}), "path": str(p)}
            for i, p in zip(result.images, paths, strict=True)
        ],
    }

    def human() -> None:
        for image, path in zip(result.images, paths, strict=True):
            print(f"saved {path} (seed {image.seed})")

    _emit(args, summary, human)
    return EXIT_OK


# -- adapters and workers ---------------------------------------------------------------------


def cmd_adapters_list(args: argparse.Namespace, client: Client) -> int:
    page = client.adapters.list(base_model=args.base_model, prefix=args.prefix, limit=args.limit)
    _emit(args, page, lambda: display.adapters(page.data))
    return EXIT_OK


def cmd_adapters_show(args: argparse.Namespace, client: Client) -> int:
    name, version = args.ref.partition("@")[0], args.ref.partition("@")[2]
    if version:
        found: Any = client.adapters.version(name, version)
        _emit(args, found, lambda: display.version(found))
    else:
        adapter = client.adapters.get(name)
        _emit(args, adapter, lambda: display.adapter(adapter))
    return EXIT_OK


def cmd_adapters_download(args: argparse.Namespace, client: Client) -> int:
    name, version = split_ref(args.ref)
    with display.transfer(f"downloading {name}@{version}", quiet=args.json) as on_progress:
        done = client.adapters.download(
            name, version, format=args.format, path=args.output, on_progress=on_progress
        )
    info = {
        "path": str(done.path),
        "size": done.size,
        "sha256": done.sha256,
        "resumed_from": done.resumed_from,
    }
    _emit(args, info, lambda: print(f"saved {done.path} ({done.size} bytes)"))
    return EXIT_OK


def cmd_adapters_alias(args: argparse.Namespace, client: Client) -> int:
    if args.delete:
        client.adapters.delete_alias(args.name, args.alias)
        _emit(args, {"deleted": args.alias}, lambda: print(f"removed {args.name}@{args.alias}"))
        return EXIT_OK
    if args.version is None:
        raise UsageError("give the VERSION the alias points at, or --delete")
    alias = client.adapters.set_alias(args.name, args.alias, args.version)
    _emit(
        args,
        alias,
        lambda: print(f"{alias.adapter}@{alias.alias} -> version {alias.version}"),
    )
    return EXIT_OK


def cmd_adapters_import(args: argparse.Namespace, client: Client) -> int:
    imported = client.adapters.import_file(args.file, name=args.name, base_model=args.base_model)
    _emit(args, imported, lambda: display.version(imported))
    return EXIT_OK


def cmd_workers(args: argparse.Namespace, client: Client) -> int:
    page = client.workers()
    _emit(args, page, lambda: display.workers(page.data))
    return EXIT_OK


# -- parser -----------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add the remote commands to the ``lorastack`` command's subparsers."""
    common = _common()

    login = _add(
        subparsers,
        "login",
        None,
        help="check and save a server URL and API key for later commands",
        example='lorastack login http://127.0.0.1:8000 --api-key "$(cat .lorastack/api_key)"',
        common=common,
    )
    login.add_argument("login_url", metavar="URL", help="the server, e.g. http://host:8000")
    login.set_defaults(func=lambda a: cmd_login(_with(a, url=a.login_url)))

    datasets = _group(
        subparsers,
        "datasets",
        help="upload, list, show and delete datasets",
        example="lorastack datasets upload ./squares --name squares",
    )
    p = _add(
        datasets,
        "upload",
        cmd_datasets_upload,
        help="upload a folder (zipped on the fly) or a zip of images and captions",
        example="lorastack datasets upload ./squares --name squares",
        common=common,
    )
    p.add_argument("path", help="a folder or a .zip")
    p.add_argument("--name", help="dataset name (default: the file or folder name)")
    p.add_argument("--caption", help="one fixed caption for every image")
    p.add_argument("--trigger-word", help="prepended to every caption")
    p = _add(
        datasets,
        "list",
        cmd_datasets_list,
        help="list datasets, newest first",
        example="lorastack datasets list --json",
        common=common,
    )
    p.add_argument("--limit", type=int)
    for name, handler, text in (
        ("show", cmd_datasets_show, "show a dataset and its preflight report"),
        ("delete", cmd_datasets_delete, "delete a dataset and its files"),
    ):
        p = _add(
            datasets,
            name,
            handler,
            help=text,
            example=f"lorastack datasets {name} ds_0123",
            common=common,
        )
        p.add_argument("dataset_id", metavar="DATASET_ID")

    p = _add(
        subparsers,
        "train",
        cmd_train,
        help="train a LoRA adapter on a dataset (an id, or a folder/zip to upload first)",
        example="lorastack train ./squares --name squares --preset tiny -p rank=8 --wait",
        common=common,
    )
    p.add_argument("dataset", metavar="DATASET", help="a dataset id, or a folder/zip to upload")
    p.add_argument("--name", required=True, help="the adapter to train (new or existing)")
    p.add_argument("--preset", help=f"hyperparameter preset: {', '.join(PRESETS)}")
    p.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a hyperparameter (repeatable), e.g. -p max_steps=200 -p learning_rate=1e-4",
    )
    p.add_argument("--base-model", help="a configured base model (default: the server's first)")
    p.add_argument("--dry-run", action="store_true", help="print the plan without queuing")
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar")

    jobs = _group(
        subparsers,
        "jobs",
        help="list, show, follow and cancel jobs",
        example="lorastack jobs logs -f job_0123",
    )
    p = _add(
        jobs,
        "list",
        cmd_jobs_list,
        help="list jobs, newest first",
        example="lorastack jobs list --status running",
        common=common,
    )
    p.add_argument("--kind", choices=["train", "generate", "ping"])
    p.add_argument(
        "--status",
        choices=["queued", "running", "cancel_requested", "succeeded", "failed", "cancelled"],
    )
    p.add_argument("--limit", type=int)
    p = _add(
        jobs,
        "show",
        cmd_jobs_show,
        help="show a job: status, progress, result or error",
        example="lorastack jobs show job_0123",
        common=common,
    )
    p.add_argument("job_id", metavar="JOB_ID")
    p = _add(
        jobs,
        "logs",
        cmd_jobs_logs,
        help="print a job's events; -f follows it with a progress bar until it ends",
        example="lorastack jobs logs -f job_0123",
        common=common,
    )
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    p = _add(
        jobs,
        "cancel",
        cmd_jobs_cancel,
        help="cancel a queued or running job",
        example="lorastack jobs cancel job_0123",
        common=common,
    )
    p.add_argument("job_id", metavar="JOB_ID")

    p = _add(
        subparsers,
        "generate",
        cmd_generate,
        help="generate images with any mix of adapters and save them as PNG",
        example='lorastack generate "a red square" --adapter squares@prod:0.8 -n 2 -o square.png',
        common=common,
    )
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME[@REF][:WEIGHT]",
        help="an adapter (repeatable): squares, squares@3, squares@prod:0.8",
    )
    p.add_argument("-n", type=int, help="number of images (several: out-0.png, out-1.png, ...)")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int, help="inference steps")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--negative-prompt")
    p.add_argument("--base-model")
    p.add_argument("-o", "--output", required=True, help="where to save the PNG")

    adapters = _group(
        subparsers,
        "adapters",
        help="list, show, download, alias and import adapters",
        example="lorastack adapters download squares@prod -o squares.safetensors",
    )
    p = _add(
        adapters,
        "list",
        cmd_adapters_list,
        help="list adapters",
        example="lorastack adapters list --prefix sq",
        common=common,
    )
    p.add_argument("--base-model")
    p.add_argument("--prefix")
    p.add_argument("--limit", type=int)
    p = _add(
        adapters,
        "show",
        cmd_adapters_show,
        help="show an adapter (versions, aliases) or one version with NAME@VERSION",
        example="lorastack adapters show squares@prod",
        common=common,
    )
    p.add_argument("ref", metavar="NAME[@VERSION]")
    p = _add(
        adapters,
        "download",
        cmd_adapters_download,
        help="download a version's safetensors file, resuming an interrupted download",
        example="lorastack adapters download squares@latest --format kohya -o squares.safetensors",
        common=common,
    )
    p.add_argument("ref", metavar="NAME[@VERSION]")
    p.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers")
    p.add_argument("-o", "--output", help="a file or a folder (default: NAME-VERSION.safetensors)")
    p = _add(
        adapters,
        "alias",
        cmd_adapters_alias,
        help="point an alias at a version, or remove it with --delete",
        example="lorastack adapters alias squares prod 3",
        common=common,
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("alias", metavar="ALIAS")
    p.add_argument("version", metavar="VERSION", type=int, nargs="?")
    p.add_argument("--delete", action="store_true", help="remove the alias")
    p = _add(
        adapters,
        "import",
        cmd_adapters_import,
        help="import a LoRA .safetensors file (diffusers, peft or kohya) as a new version",
        example="lorastack adapters import my_lora.safetensors --name mine --base-model tiny",
        common=common,
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--name", required=True)
    p.add_argument("--base-model", required=True)

    _add(
        subparsers,
        "workers",
        cmd_workers,
        help="list live workers: queues, base model, device, current job",
        example="lorastack workers --json",
        common=common,
    )
