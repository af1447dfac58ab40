"""The PyTorch reference for `python -m vnet_jax.bench train`: the same VNet, loss and optimizer.

Not part of the package (PyTorch is not a dependency). It exists so the CPU comparison in
docs/performance.md can be rerun on any machine:

  python3.11 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
  /tmp/torchvenv/bin/python scripts/torch_vnet_step.py --patch 64 --batch 1 \
      --filters 16,32,64,128,128

Mirrors vnet_jax/model.py: residual blocks of two 3x3x3 convs with BatchNorm (ReLU between,
1x1 shortcut where channels change), 2x2x2 stride-2 convolution down and transposed convolution
up, skip concatenation, dropout 0.1 after each downsampling and before the 1x1 head; softmax,
Dice + focal loss (the seed's formulas, vnet_jax/losses.py), Adam. Prints one JSON line like
the bench's.
"""

import argparse
import json
import time

import numpy as np
import torch
from torch import nn


class ResidualBlock(nn.Module):
  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
    self.bn1 = nn.BatchNorm3d(cout, momentum=0.1)
    self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
    self.bn2 = nn.BatchNorm3d(cout, momentum=0.1)
    self.shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class VNet(nn.Module):
  def __init__(self, num_classes: int, filters: list[int], dropout: float = 0.1):
    super().__init__()
    self.first = ResidualBlock(1, filters[0])
    self.down = nn.ModuleList(
      nn.Conv3d(a, b, 2, stride=2) for a, b in zip(filters[:-1], filters[1:])
    )
    self.enc = nn.ModuleList(ResidualBlock(f, f) for f in filters[1:])
    ups = list(zip(reversed(filters[1:]), reversed(filters[:-1])))
    self.up = nn.ModuleList(nn.ConvTranspose3d(a, b, 2, stride=2) for a, b in ups)
    self.dec = nn.ModuleList(ResidualBlock(2 * b, b) for _, b in ups)
    self.dropout = nn.Dropout(dropout)
    self.head = nn.Conv3d(filters[0], num_classes, 1)

  def forward(self, x):
    x = self.first(x)
    skips = []
    for down, block in zip(self.down, self.enc):
      skips.append(x)
      x = block(self.dropout(down(x)))
    for up, block, skip in zip(self.up, self.dec, reversed(skips)):
      x = block(torch.cat([up(x), skip], dim=1))
    return self.head(self.dropout(x))


def total_loss(logits, onehot, smooth=1e-5, alpha=0.25, gamma=2.0):
  probs = torch.softmax(logits, dim=1)
  axes = (0, 2, 3, 4)
  tp = (onehot * probs).sum(axes)
  fp = probs.sum(axes) - tp
  fn = onehot.sum(axes) - tp
  dice = 1 - ((2 * tp + smooth) / (2 * tp + fn + fp + smooth)).mean()
  p = probs.clamp(1e-7, 1 - 1e-7)
  focal = (-onehot * alpha * (1 - p) ** gamma * torch.log(p)).mean()
  return dice + focal


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--patch", type=int, default=64)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--filters", default="16,32,64,128,128")
  parser.add_argument("--classes", type=int, default=14)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  filters = [int(f) for f in args.filters.split(",")]
  model = VNet(args.classes, filters)
  opt = torch.optim.Adam(model.parameters(), lr=1e-4)
  rng = np.random.default_rng(0)
  shape = (args.batch, 1, args.patch, args.patch, args.patch)
  x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
  labels = torch.from_numpy(rng.integers(0, args.classes, (args.batch, *shape[2:])))
  onehot = torch.nn.functional.one_hot(labels, args.classes).permute(0, 4, 1, 2, 3).float()

  def step():
    opt.zero_grad(set_to_none=True)
    loss = total_loss(model(x), onehot)
    loss.backward()
    opt.step()
    return float(loss.detach())

  step()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
  print(
    json.dumps(
      {
        "bench": "torch_train",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "patch": args.patch,
        "batch": args.batch,
        "filters": filters,
        "steps": args.steps,
        "step_s": round(float(np.median(times)), 4),
        "step_s_min": round(min(times), 4),
        "step_s_max": round(max(times), 4),
        "loss": loss,
      }
    )
  )


if __name__ == "__main__":
  main()
