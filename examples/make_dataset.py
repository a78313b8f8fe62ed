"""Write a small example dataset zip (coloured squares with captions, pairs layout).

python examples/make_dataset.py squares.zip [--count 8] [--size 64]
"""

from __future__ import annotations

import argparse
import io
import zipfile

from PIL import Image, ImageDraw

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "white"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    with zipfile.ZipFile(args.out, "w") as archive:
        for i in range(args.count):
            colour = COLOURS[i % len(COLOURS)]
            image = Image.new("RGB", (args.size, args.size), "black")
            inset = args.size // 8 + (i % 3) * 2
            ImageDraw.Draw(image).rectangle(
                [inset, inset, args.size - inset, args.size - inset], fill=colour
            )
            png = io.BytesIO()
            image.save(png, format="PNG")
            archive.writestr(f"square_{i:02d}.png", png.getvalue())
            archive.writestr(f"square_{i:02d}.txt", f"a {colour} square")
    print(args.out)


if __name__ == "__main__":
    main()
