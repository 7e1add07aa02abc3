"""Images/s of patch-based inference: every patch at once against patch-by-patch procedures.

    python -m benchmarks.patch_inference [--model resnet18] [--image_size 1024] [--patch 224]
        [--ks 10 50 100] [--images 2] [--chunk 0] [--chunks 1 2 8] [--repeats 3]
        [--no_reference] [--out FILE]

Ways to classify `--images` chest X-rays from K patches each, timed in turns in the same run on
the same network and weights (phantom X-rays with their lung masks, written once as PNGs):

  batched    cxflax: masked images on the device, K patch centres drawn inside each mask, all
             B·K patches cropped (vmap over lax.dynamic_slice) and classified in one compiled
             program, `--chunk` patches per forward pass (0: cxflax's automatic choice,
             patches.default_chunk), votes counted on the device;
  one_pass   the same with all B·K patches in one forward pass (cxflax before chunking);
  chunk_N    the same with N patches per pass, for each N in `--chunks` (to choose the rule);
  loop       the same compiled network called on one patch at a time in a Python loop (patches
             cropped on the device at the same centres): what a direct port would do;
  reference  the authors' procedure: each patch a separate pass at batch size 1 that re-reads the
             image and its mask from disk, resizes and masks the image, draws a centre, crops
             the patch on the host, and runs the network (left out with --no_reference).

All classify the same patches and must give the same votes (checked here, and in
tests/test_patches.py). Prints a table (medians of --repeats; vs_loop = loop time / batched
time, measured in the same run), writes JSON (benchmarks/results/patch_inference.json).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from benchmarks.common import default_out, print_table, time_alternately, write_json
from cxflax.data import phantom as phantom_lib
from cxflax.data.images import write_image, write_mask
from cxflax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cxflax.models.heads import create_network
from cxflax.models.patches import PatchClassifier, crop_patches, default_chunk, mask_key, sample_centers


def write_images(folder: str, n: int, size: int) -> list[tuple[str, str]]:
  """n phantom X-rays and their lung masks as 8-bit PNGs."""
  ph = phantom_lib.Phantom("cxr", num_subjects=n, image_size=size, slices_per_subject=(1, 1), seed=0)
  files = []
  for i in range(n):
    ex = ph[i]
    img, mask = os.path.join(folder, f"image_{i}.png"), os.path.join(folder, f"mask_{i}.png")
    write_image(img, np.asarray(ex["image"]).reshape(size, size))
    write_mask(mask, np.asarray(ex["lung_mask"]).reshape(size, size), (size, size))
    files.append((img, mask))
  return files


def load_masked(image_path: str, mask_path: str, size: int) -> tuple[np.ndarray, np.ndarray]:
  """The preprocessing of one image: read, resize, gray to RGB, mask, ImageNet-normalise."""
  img = Image.open(image_path).convert("L").resize((size, size), Image.BILINEAR)
  mask = np.asarray(Image.open(mask_path).convert("L").resize((size, size), Image.NEAREST)) > 127
  x = np.repeat((np.asarray(img, np.float32) / 255.0)[..., None], 3, -1) * mask[..., None]
  x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
  return x.astype(np.float32), mask.astype(np.float32)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="resnet18", help="patch network (Oh, Park & Ye use resnet18)")
  ap.add_argument("--image_size", type=int, default=1024)
  ap.add_argument("--patch", type=int, default=224)
  ap.add_argument("--ks", type=int, nargs="+", default=[10, 50, 100])
  ap.add_argument("--images", type=int, default=2)
  ap.add_argument("--chunk", type=int, default=0, help="patches per pass of `batched`; 0: automatic")
  ap.add_argument("--chunks", type=int, nargs="*", default=[], help="also time these chunk sizes")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--no_reference", action="store_true", help="leave out the (slow) reference procedure")
  ap.add_argument("--out", default=default_out("patch_inference"))
  args = ap.parse_args()

  network = create_network(args.model, "linear", 4)
  with tempfile.TemporaryDirectory() as tmp:
    files = write_images(tmp, args.images, args.image_size)
    loaded = [load_masked(i, m, args.image_size) for i, m in files]
    x = jnp.asarray(np.stack([np.concatenate([a, m[..., None]], -1) for a, m in loaded]))
    variables = jax.jit(lambda: network.init(jax.random.key(0), jnp.zeros((1, args.patch, args.patch, 3))))()
    forward_one = jax.jit(lambda v, p: network.apply(v, p, train=False))
    crop = jax.jit(crop_patches, static_argnums=2)
    forward_one(variables, jnp.zeros((1, args.patch, args.patch, 3))).block_until_ready()
    rows = []
    for k in args.ks:
      wrapped = {col: {"network": tree} for col, tree in variables.items()}
      chunk = args.chunk or default_chunk(args.patch) or args.images * k

      def batched(chunk):
        model = PatchClassifier(network=network, patch_size=args.patch, num_patches=k, aggregate="vote",
                                chunk=chunk)
        votes_of = jax.jit(lambda v, x: model.apply(v, x, train=False))
        return lambda: np.asarray(votes_of(wrapped, x))

      def run_loop():
        out = []
        for i in range(x.shape[0]):
          mask = x[i, ..., -1]
          centers = sample_centers(mask_key(jax.random.key(0), mask), mask, k)
          patches = crop(x[i, ..., :-1], centers, args.patch)
          votes = np.zeros(4)
          for j in range(k):
            votes[int(np.argmax(forward_one(variables, patches[j:j + 1])[0]))] += 1
          out.append(votes / k)
        return np.stack(out)

      def run_reference():
        rng = np.random.default_rng(0)
        out = []
        for image_path, mask_path in files:
          votes = np.zeros(4)
          for _ in range(k):
            img, mask = load_masked(image_path, mask_path, args.image_size)
            rows_, cols_ = np.nonzero(mask)
            j = rng.integers(len(rows_))
            top = int(np.clip(rows_[j] - args.patch // 2, 0, args.image_size - args.patch))
            left = int(np.clip(cols_[j] - args.patch // 2, 0, args.image_size - args.patch))
            patch = img[top:top + args.patch, left:left + args.patch][None]
            votes[int(np.argmax(forward_one(variables, jnp.asarray(patch))[0]))] += 1
          out.append(votes / k)
        return np.stack(out)

      fns = {"batched": batched(chunk), "one_pass": batched(args.images * k)}
      fns.update({f"chunk_{c}": batched(c) for c in args.chunks})
      loop_votes = run_loop()
      compile_s = {}
      for name, fn in fns.items():
        t0 = time.perf_counter()
        first = fn()  # compiles
        compile_s[name] = time.perf_counter() - t0
        if not np.allclose(np.exp(first) / np.exp(first).sum(-1, keepdims=True), loop_votes, atol=1e-4):
          raise AssertionError(f"K={k}: {name} and loop votes differ")
      fns["loop"] = run_loop
      if not args.no_reference:
        fns["reference"] = run_reference
      timings = time_alternately(fns, repeats=args.repeats, warmup=0)
      n = args.images
      row = {"K": k, "images": n, "chunk": chunk}
      row.update({f"{name}_img_s": n / t for name, t in timings.items()})
      reference = timings.get("reference")
      row.update({"vs_loop": timings["loop"] / timings["batched"],
                  "one_pass_vs_loop": timings["loop"] / timings["one_pass"],
                  "vs_reference": reference / timings["batched"] if reference else None,
                  "batched_compile_s": compile_s["batched"], "same_votes": True})
      rows.append(row)
      print(", ".join(f"{key} {v:.3g}" if isinstance(v, float) else f"{key} {v}" for key, v in row.items()),
            flush=True)
  columns = (["K", "images", "chunk", "batched_img_s", "one_pass_img_s"] +
             [f"chunk_{c}_img_s" for c in args.chunks] +
             ["loop_img_s", "reference_img_s", "vs_loop", "one_pass_vs_loop", "vs_reference",
              "batched_compile_s", "same_votes"])
  path = write_json(args.out, "patch_inference", rows, model=args.model, image_size=args.image_size,
                    patch=args.patch, backend=jax.default_backend(), repeats=args.repeats)
  print(f"\n{args.model}, {args.image_size}-px images, {args.patch}-px patches, {jax.device_count()} "
        f"{jax.default_backend()} device(s); results in {path}")
  print_table(rows, columns)


if __name__ == "__main__":
  main()
