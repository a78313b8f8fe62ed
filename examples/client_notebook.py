# %% [markdown]
# # lorastack from Python
#
# A notebook-style walk through the client (each `# %%` is a cell in Jupyter or VS Code). It
# needs a running server: `make run` in the repo root, then
# `LORASTACK_URL=http://127.0.0.1:8000 LORASTACK_API_KEY=$(cat .lorastack/api_key)`.

# %%
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from lorastack import Client, Progress

client = Client()  # reads LORASTACK_URL / LORASTACK_API_KEY, or the `lorastack login` file
print(client.workers().data[0].queues)

# %% [markdown]
# A dataset is a folder of images with same-named `.txt` captions; the client zips it on the fly.

# %%
folder = Path(tempfile.mkdtemp()) / "squares"
folder.mkdir()
for i, colour in enumerate(["red", "green", "blue", "yellow", "purple", "orange"]):
    picture = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(picture).rectangle([12, 12, 52, 52], fill=colour)
    picture.save(folder / f"{i:02d}.png")
    (folder / f"{i:02d}.txt").write_text(f"a {colour} square")

dataset = client.datasets.upload(folder, name="squares")
print(dataset.id, dataset.pair_count, "pairs")

# %% [markdown]
# Train with tiny settings (the embedded CPU model) and watch the progress.

# %%
job = client.jobs.create(
    dataset.id,
    "squares",
    hyperparameters={"max_steps": 20, "resolution": 64, "rank": 4, "learning_rate": 1e-3},
)


def show(progress: Progress) -> None:
    if progress.step is not None:
        print(f"{progress.status} {progress.step}/{progress.total_steps} loss {progress.loss}")


job = client.jobs.wait(job.id, on_progress=show)
print(job.result)

# %% [markdown]
# Generate with the new adapter at weight 0.8; in Jupyter an `Image` displays itself.

# %%
images = client.generate(
    "a red square", adapters=[("squares@latest", 0.8)], num_inference_steps=4, seed=1
)
images[0].save("square.png")
images[0]

# %% [markdown]
# Download it for diffusers and for A1111/ComfyUI (kohya).

# %%
for fmt in ("diffusers", "kohya"):
    done = client.adapters.download("squares", "latest", format=fmt, path=".")
    print(done.path, done.size, "bytes")
