"""The remote commands themselves: each takes the parsed arguments and a ``Client`` and returns
its exit code (``remote.run_command`` maps client errors to exit codes)."""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path
from typing import Any

from lorastack.cli import display
from lorastack.cli.output import (
    EXIT_INTERRUPTED,
    EXIT_JOB_FAILED,
    EXIT_OK,
    UsageError,
    emit,
    evaluation_from,
    parse_adapter,
    parse_axis,
    parse_grid,
    parse_params,
    split_ref,
)
from lorastack.client import Client, models

# Hyperparameter starting points (`train --preset`); `-p key=value` overrides any of them.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"max_steps": 20, "resolution": 64, "rank": 4, "learning_rate": 1e-3},
    "quick": {"max_steps": 300, "resolution": 512, "rank": 8, "learning_rate": 1e-4},
    "standard": {"max_steps": 1500, "resolution": 512, "rank": 16, "learning_rate": 1e-4},
}

# Run statuses that have not ended yet.
ACTIVE = ("queued", "running", "cancel_requested")


def cmd_datasets_upload(args: argparse.Namespace, client: Client) -> int:
    with display.transfer(f"uploading {args.path}", quiet=args.json) as on_progress:
        dataset = client.datasets.upload(
            args.path,
            name=args.name or Path(args.path).stem,
            caption=args.caption,
            trigger_word=args.trigger_word,
            on_progress=on_progress,
        )
    emit(args, dataset, lambda: display.dataset(dataset))
    return EXIT_OK


def cmd_datasets_list(args: argparse.Namespace, client: Client) -> int:
    page = client.datasets.list(limit=args.limit)
    emit(args, page, lambda: display.datasets(page.data))
    return EXIT_OK


def cmd_datasets_show(args: argparse.Namespace, client: Client) -> int:
    dataset = client.datasets.get(args.dataset_id)
    emit(args, dataset, lambda: display.dataset(dataset))
    return EXIT_OK


def cmd_datasets_delete(args: argparse.Namespace, client: Client) -> int:
    client.datasets.delete(args.dataset_id)
    emit(args, {"deleted": args.dataset_id}, lambda: print(f"deleted {args.dataset_id}"))
    return EXIT_OK


def _hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    if args.preset and args.preset not in PRESETS:
        raise UsageError(f"--preset {args.preset}: one of {', '.join(PRESETS)}")
    return {**PRESETS.get(args.preset or "", {}), **parse_params(args.param)}


def _dataset_id(args: argparse.Namespace, client: Client) -> str:
    """DATASET as given, or the id of the folder/zip it names once uploaded."""
    if not Path(args.dataset).exists():
        return str(args.dataset)
    with display.transfer(f"uploading {args.dataset}", quiet=args.json) as on_progress:
        return client.datasets.upload(args.dataset, name=args.name, on_progress=on_progress).id


def cmd_train(args: argparse.Namespace, client: Client) -> int:
    hyperparameters = _hyperparameters(args)
    evaluation = evaluation_from(args)
    dataset_id = _dataset_id(args, client)
    created = client.jobs.create(
        dataset_id,
        args.name,
        base_model=args.base_model,
        hyperparameters=hyperparameters,
        evaluation=evaluation,
        publish=args.publish,
        dry_run=args.dry_run,
    )
    if isinstance(created, models.TrainingPlan) or not args.wait:
        emit(args, created, lambda: display.created(created))
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
                emit(args, job, lambda: display.err(f"cancel requested for {job_id}"))
                return EXIT_JOB_FAILED
            display.err(f"detached; follow again with: lorastack jobs logs -f {job_id}")
            return EXIT_INTERRUPTED
    emit(args, job, lambda: display.job(job))
    return EXIT_OK if job.status == "succeeded" else EXIT_JOB_FAILED


def cmd_jobs_list(args: argparse.Namespace, client: Client) -> int:
    page = client.jobs.list(kind=args.kind, status=args.status, limit=args.limit)
    emit(args, page, lambda: display.jobs(page.data))
    return EXIT_OK


def cmd_jobs_show(args: argparse.Namespace, client: Client) -> int:
    job = client.jobs.get(args.job_id)
    emit(args, job, lambda: display.job(job))
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

    emit(args, events, human)
    return EXIT_OK


def cmd_jobs_cancel(args: argparse.Namespace, client: Client) -> int:
    job = client.jobs.cancel(args.job_id)
    emit(args, job, lambda: print(f"{job.id}: {job.status}"))
    return EXIT_OK


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

    emit(args, summary, human)
    return EXIT_OK


def cmd_grid(args: argparse.Namespace, client: Client) -> int:
    """POST /grids, follow its job when it outlasts the wait, save the labeled PNG."""
    body: dict[str, Any] = {"x": parse_axis(args.x, "--x")}
    if args.y:
        body["y"] = parse_axis(args.y, "--y")
    options = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "adapter": args.adapter,
        "weight": args.weight,
        "seed": args.seed,
        "num_inference_steps": args.steps,
        "width": args.width,
        "height": args.height,
        "base_model": args.base_model,
    }
    body.update({k: v for k, v in options.items() if v is not None})
    key = f"cli-grid-{uuid.uuid4().hex}"  # resent after the wait: answers the same job
    answer = client.grid({**body, "wait": 30}, idempotency_key=key)
    if isinstance(answer, models.Job):
        if not args.json:
            display.err(f"grid job {answer.id} queued; following it")
        job = client.jobs.wait(answer.id, raise_on_failure=False)
        if job.status != "succeeded":
            emit(args, job, lambda: display.job(job))
            return EXIT_JOB_FAILED
        answer = client.grid({**body, "wait": 30}, idempotency_key=key)
    grid = answer
    if not isinstance(grid, models.Grid) or grid.image_id is None:
        raise UsageError("the grid has no image")  # unreachable: a finished grid has one
    output = Path(args.output)
    output.write_bytes(client.image(grid.image_id))
    summary = {**grid.model_dump(mode="json"), "path": str(output)}
    emit(args, summary, lambda: print(f"saved {output} ({len(grid.rows)}x{len(grid.columns)})"))
    return EXIT_OK


def cmd_experiments_create(args: argparse.Namespace, client: Client) -> int:
    body: dict[str, Any] = {
        "adapter_name": args.name,
        "grid": parse_grid(args.grid),
        "hyperparameters": _hyperparameters(args),
    }
    evaluation = evaluation_from(args)
    if evaluation is not None:
        body["evaluation"] = evaluation
    if args.publish:
        body["publish"] = args.publish
    if args.base_model:
        body["base_model"] = args.base_model
    body["dataset_id"] = _dataset_id(args, client)
    experiment = client.experiments.create(body)
    if not args.wait:
        emit(args, experiment, lambda: display.experiment(experiment))
        return EXIT_OK
    if not args.json:
        display.err(
            f"experiment {experiment.id}: {len(experiment.runs)} runs queued; waiting "
            "(Ctrl-C detaches; the runs go on)"
        )
    seen = experiment.status
    try:
        while experiment.status in ("queued", "running"):
            time.sleep(args.poll)
            experiment = client.experiments.get(experiment.id)
            if experiment.status != seen and not args.json:
                done = sum(r.status not in ACTIVE for r in experiment.runs)
                display.err(f"{experiment.id} {experiment.status}: {done}/{len(experiment.runs)}")
                seen = experiment.status
    except KeyboardInterrupt:
        display.err(f"detached; see it with: lorastack experiments show {experiment.id}")
        return EXIT_INTERRUPTED
    emit(args, experiment, lambda: display.experiment(experiment))
    return EXIT_OK if experiment.status == "succeeded" else EXIT_JOB_FAILED


def cmd_experiments_list(args: argparse.Namespace, client: Client) -> int:
    page = client.experiments.list(limit=args.limit, after=args.after)
    emit(args, page, lambda: display.experiments(page.data))
    return EXIT_OK


def cmd_experiments_show(args: argparse.Namespace, client: Client) -> int:
    experiment = client.experiments.get(args.experiment_id)
    emit(args, experiment, lambda: display.experiment(experiment))
    return EXIT_OK


def cmd_experiments_report(args: argparse.Namespace, client: Client) -> int:
    text = client.experiments.report(args.experiment_id, format=args.format)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        info = {"path": args.output, "format": args.format, "bytes": len(text.encode())}
        emit(args, info, lambda: print(f"saved {args.output}"))
    elif args.json:
        emit(args, {"format": args.format, "report": text}, lambda: None)
    else:
        print(text, end="")
    return EXIT_OK


def cmd_adapters_list(args: argparse.Namespace, client: Client) -> int:
    page = client.adapters.list(base_model=args.base_model, prefix=args.prefix, limit=args.limit)
    emit(args, page, lambda: display.adapters(page.data))
    return EXIT_OK


def cmd_adapters_show(args: argparse.Namespace, client: Client) -> int:
    name, version = args.ref.partition("@")[0], args.ref.partition("@")[2]
    if version:
        found: Any = client.adapters.version(name, version)
        emit(args, found, lambda: display.version(found))
    else:
        adapter = client.adapters.get(name)
        emit(args, adapter, lambda: display.adapter(adapter))
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
    emit(args, info, lambda: print(f"saved {done.path} ({done.size} bytes)"))
    return EXIT_OK


def cmd_adapters_alias(args: argparse.Namespace, client: Client) -> int:
    if args.delete:
        client.adapters.delete_alias(args.name, args.alias)
        emit(args, {"deleted": args.alias}, lambda: print(f"removed {args.name}@{args.alias}"))
        return EXIT_OK
    if args.version is None:
        raise UsageError("give the VERSION the alias points at, or --delete")
    alias = client.adapters.set_alias(args.name, args.alias, args.version)
    emit(
        args,
        alias,
        lambda: print(f"{alias.adapter}@{alias.alias} -> version {alias.version}"),
    )
    return EXIT_OK


def cmd_adapters_import(args: argparse.Namespace, client: Client) -> int:
    imported = client.adapters.import_file(args.file, name=args.name, base_model=args.base_model)
    emit(args, imported, lambda: display.version(imported))
    return EXIT_OK


def cmd_workers(args: argparse.Namespace, client: Client) -> int:
    page = client.workers()
    emit(args, page, lambda: display.workers(page.data))
    return EXIT_OK
