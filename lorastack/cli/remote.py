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
from collections.abc import Callable
from typing import Any

from lorastack.cli import display
from lorastack.cli.commands import (
    PRESETS,
    cmd_adapters_alias,
    cmd_adapters_download,
    cmd_adapters_import,
    cmd_adapters_list,
    cmd_adapters_show,
    cmd_datasets_delete,
    cmd_datasets_list,
    cmd_datasets_show,
    cmd_datasets_upload,
    cmd_experiments_create,
    cmd_experiments_list,
    cmd_experiments_report,
    cmd_experiments_show,
    cmd_generate,
    cmd_grid,
    cmd_jobs_cancel,
    cmd_jobs_list,
    cmd_jobs_logs,
    cmd_jobs_show,
    cmd_train,
    cmd_workers,
)
from lorastack.cli.output import (
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SERVER,
    EXIT_USAGE,
    UsageError,
    emit,
    fail,
)
from lorastack.client import Client, errors
from lorastack.client.config import save_login

Handler = Callable[[argparse.Namespace, Client], int]


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
        return fail(args, EXIT_USAGE, str(exc))
    except errors.JobFailed as exc:
        message = str(exc)
        emit(args, exc.job, lambda: display.err(message))
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
        return fail(args, EXIT_SERVER, str(exc))
    except KeyboardInterrupt:
        display.err("interrupted")
        return EXIT_INTERRUPTED


def cmd_login(args: argparse.Namespace) -> None:
    """Check the URL and key against the server, then save them (mode 0600)."""
    key = args.api_key
    if not key:
        key = display.ask_secret("API key: ") if sys.stdin.isatty() else sys.stdin.readline()
    key = key.strip()
    if not key:
        raise SystemExit(fail(args, EXIT_USAGE, "no API key given"))
    code = run_command(lambda a, c: _check_login(a, c, key), _with(args, api_key=key))
    raise SystemExit(code)


def _check_login(args: argparse.Namespace, client: Client, key: str) -> int:
    client.datasets.list(limit=1)  # proves the URL and the key
    path = save_login(url=client.url, api_key=key)
    emit(
        args,
        {"url": client.url, "config": str(path)},
        lambda: print(f"logged in to {client.url} (saved in {path})"),
    )
    return EXIT_OK


def _with(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def register(subparsers: Any) -> None:
    """Add the remote commands to the ``lorastack`` command's subparsers."""
    common = _common()
    _register_login(subparsers, common)
    _register_datasets(subparsers, common)
    _register_train(subparsers, common)
    _register_jobs(subparsers, common)
    _register_generate(subparsers, common)
    _register_grid(subparsers, common)
    _register_experiments(subparsers, common)
    _register_adapters(subparsers, common)
    _register_workers(subparsers, common)


def _register_login(subparsers: Any, common: argparse.ArgumentParser) -> None:
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


def _register_datasets(subparsers: Any, common: argparse.ArgumentParser) -> None:
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


def _register_train(subparsers: Any, common: argparse.ArgumentParser) -> None:
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
    _hyperparameter_arguments(p)
    p.add_argument("--base-model", help="a configured base model (default: the server's first)")
    _evaluation_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan without queuing")
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar")


def _hyperparameter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"hyperparameter preset: {', '.join(PRESETS)}")
    p.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a hyperparameter (repeatable), e.g. -p max_steps=200 -p learning_rate=1e-4",
    )


def _evaluation_arguments(p: argparse.ArgumentParser) -> None:
    """The ``evaluation`` object and ``publish`` (docs/evaluation.md)."""
    group = p.add_argument_group("evaluation (scores every checkpoint, base vs LoRA)")
    group.add_argument(
        "--eval-prompt",
        action="append",
        default=[],
        metavar="PROMPT",
        help="an evaluation prompt (repeatable); without one nothing is evaluated",
    )
    group.add_argument(
        "--control-prompt",
        action="append",
        default=[],
        metavar="PROMPT",
        help="a prompt the adapter should leave alone (repeatable): measures leakage",
    )
    group.add_argument(
        "--eval-seed",
        action="append",
        default=[],
        type=int,
        metavar="SEED",
        help="a seed every checkpoint renders the prompts with (repeatable)",
    )
    group.add_argument(
        "--eval-steps", type=int, metavar="N", help="inference steps of the evaluation images"
    )
    group.add_argument(
        "--select",
        metavar="METRIC:max|min",
        help="how the best checkpoint is picked (default clip_score:max)",
    )
    group.add_argument(
        "--publish",
        choices=["final", "best"],
        help="which checkpoint becomes the new version (best needs an evaluation)",
    )


def _register_jobs(subparsers: Any, common: argparse.ArgumentParser) -> None:
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


def _register_generate(subparsers: Any, common: argparse.ArgumentParser) -> None:
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
        help="an adapter (repeatable): squares, squares@3, squares@prod:0.8, "
        "squares@ckpt:400:0.8 (a checkpoint), job_0123@ckpt:400",
    )
    p.add_argument("-n", type=int, help="number of images (several: out-0.png, out-1.png, ...)")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int, help="inference steps")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--negative-prompt")
    p.add_argument("--base-model")
    p.add_argument("-o", "--output", required=True, help="where to save the PNG")


def _register_grid(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p = _add(
        subparsers,
        "grid",
        cmd_grid,
        help="render a labeled X/Y grid over prompts, seeds, adapter refs or weights as one PNG",
        example="lorastack grid --x adapter=none,squares@ckpt:200,squares@best --y seed=1,2 "
        '--prompt "a red square" -o grid.png',
        common=common,
    )
    axis_help = "KIND=v1,v2,... with KIND prompt, seed, adapter (none = the base model) or weight"
    p.add_argument("--x", required=True, metavar="KIND=VALUES", help=f"the columns: {axis_help}")
    p.add_argument("--y", metavar="KIND=VALUES", help="the rows, another KIND")
    p.add_argument("--prompt", help="every cell's prompt, unless an axis is prompt")
    p.add_argument(
        "--adapter", metavar="NAME[@REF]", help="every cell's adapter, unless an axis is"
    )
    p.add_argument("--weight", type=float, help="its weight, unless an axis is weight")
    p.add_argument("--seed", type=int, help="every cell's seed, unless an axis is seed")
    p.add_argument("--steps", type=int, help="inference steps")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--negative-prompt")
    p.add_argument("--base-model")
    p.add_argument("-o", "--output", required=True, help="where to save the PNG")


def _register_experiments(subparsers: Any, common: argparse.ArgumentParser) -> None:
    experiments = _group(
        subparsers,
        "experiments",
        help="run a grid of training runs and compare them (create, list, show, report)",
        example="lorastack experiments create ds_0123 --name sq --grid rank=8,32 "
        '--eval-prompt "a red square" --wait',
    )
    p = _add(
        experiments,
        "create",
        cmd_experiments_create,
        help="queue one training run per combination of the grid's values",
        example="lorastack experiments create ./squares --name sq --grid rank=8,32 "
        '--grid learning_rate=1e-4,1e-3 --eval-prompt "a red square" --select clip_score:max',
        common=common,
    )
    p.add_argument("dataset", metavar="DATASET", help="a dataset id, or a folder/zip to upload")
    p.add_argument("--name", required=True, help="the prefix: run i trains PREFIX-i")
    p.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="a hyperparameter and its values (repeatable): one run per combination",
    )
    _hyperparameter_arguments(p)
    p.add_argument("--base-model", help="a configured base model (default: the server's first)")
    _evaluation_arguments(p)
    p.add_argument("--wait", action="store_true", help="wait until every run has ended")
    p.add_argument("--poll", type=float, default=2.0, help=argparse.SUPPRESS)
    p = _add(
        experiments,
        "list",
        cmd_experiments_list,
        help="list experiments, newest first",
        example="lorastack experiments list --json",
        common=common,
    )
    p.add_argument("--limit", type=int)
    p.add_argument("--after", metavar="ID", help="the page after this experiment id")
    p = _add(
        experiments,
        "show",
        cmd_experiments_show,
        help="show an experiment: its runs, their metrics, the best run",
        example="lorastack experiments show exp_0123",
        common=common,
    )
    p.add_argument("experiment_id", metavar="ID")
    p = _add(
        experiments,
        "report",
        cmd_experiments_report,
        help="print or save the comparison table as Markdown or CSV",
        example="lorastack experiments report exp_0123 --format csv -o runs.csv",
        common=common,
    )
    p.add_argument("experiment_id", metavar="ID")
    p.add_argument("--format", choices=["md", "csv"], default="md")
    p.add_argument("-o", "--output", help="save to this file instead of printing")


def _register_adapters(subparsers: Any, common: argparse.ArgumentParser) -> None:
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


def _register_workers(subparsers: Any, common: argparse.ArgumentParser) -> None:
    _add(
        subparsers,
        "workers",
        cmd_workers,
        help="list live workers: queues, base model, device, current job",
        example="lorastack workers --json",
        common=common,
    )
