#!/usr/bin/env python3
"""The PyTorch-on-CPU counterpart of `cargo bench --bench cpu_step`: the same PSPNet-ResNet-18
(dilated, output stride 8, per-dataset BatchNorm, PPM bins 1/2/3/6, auxiliary head on layer3,
one classifier per dataset), one DAT training step (one forward per dataset, summed loss
`loss + 0.4·aux` per dataset, ONE backward, one SGD step with momentum 0.9 and weight decay
1e-4) and one eval-mode forward (forward, bilinear upsampling to the image, argmax) of one
dataset's batch.

Shapes (`--shape`):
  defaults  width 0.25, 96x96, 4 images per dataset (what `cdcl train` runs by default)
  full      width 1.0, 256x256, 2 images per dataset

Prints one line per measurement: `torch <shape> train|eval <median seconds> [all times]`.
PyTorch is not a dependency of the crate or of CI; install it in a private virtual environment
to run this (see docs/performance.md).
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class DSBN(nn.Module):
    """One BatchNorm2d per dataset; a DAT forward carries one dataset's samples only."""

    def __init__(self, c, d):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(d))

    def forward(self, x, ds):
        return self.bns[ds](x)


class Dab(nn.Module):
    def __init__(self, cin, cout, k, stride, pad, dil, d):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, pad, dil, bias=False)
        self.bn = DSBN(cout, d)

    def forward(self, x, ds, relu=True, residual=None):
        y = self.bn(self.conv(x), ds)
        if residual is not None:
            y = y + residual
        return F.relu(y) if relu else y


class Basic(nn.Module):
    def __init__(self, cin, planes, stride, dil, d):
        super().__init__()
        self.a = Dab(cin, planes, 3, stride, dil, dil, d)
        self.b = Dab(planes, planes, 3, 1, dil, dil, d)
        self.down = Dab(cin, planes, 1, stride, 0, 1, d) if stride != 1 or cin != planes else None

    def forward(self, x, ds):
        idn = self.down(x, ds, relu=False) if self.down is not None else x
        return self.b(self.a(x, ds), ds, relu=True, residual=idn)


class PspNet(nn.Module):
    def __init__(self, width, classes):
        super().__init__()
        d = len(classes)
        ch = lambda c: max(1, round(c * width))  # noqa: E731
        self.stem = Dab(3, ch(64), 7, 2, 3, 1, d)
        layers, cin = [], ch(64)
        for li, (stride, dil) in enumerate([(1, 1), (2, 1), (1, 2), (1, 4)]):
            planes = ch(64 << li)
            blocks = []
            for bi in range(2):
                blocks.append(Basic(cin, planes, stride if bi == 0 else 1, dil, d))
                cin = planes
            layers.append(nn.ModuleList(blocks))
            if li == 2:
                l3 = cin
        self.layers = nn.ModuleList(layers)
        feat = cin
        red = max(1, feat // 4)
        self.bins = [1, 2, 3, 6]
        self.ppm = nn.ModuleList(Dab(feat, red, 1, 1, 0, 1, d) for _ in self.bins)
        self.bottleneck = Dab(feat + 4 * red, ch(512), 3, 1, 1, 1, d)
        self.cls = nn.ModuleList(nn.Conv2d(ch(512), c, 1) for c in classes)
        self.aux = Dab(l3, ch(256), 3, 1, 1, 1, d)
        self.aux_cls = nn.ModuleList(nn.Conv2d(ch(256), c, 1) for c in classes)

    def forward(self, x, ds):
        h, w = x.shape[2:]
        x = F.max_pool2d(self.stem(x, ds), 3, 2, 1)
        for li, layer in enumerate(self.layers):
            for b in layer:
                x = b(x, ds)
            if li == 2:
                l3 = x
        fh, fw = x.shape[2:]
        parts = [x]
        for b, dab in zip(self.bins, self.ppm):
            p = dab(F.adaptive_avg_pool2d(x, b), ds)
            parts.append(F.interpolate(p, (fh, fw), mode="bilinear", align_corners=True))
        f = F.dropout2d(self.bottleneck(torch.cat(parts, 1), ds), 0.1, self.training)
        main = F.interpolate(self.cls[ds](f), (h, w), mode="bilinear", align_corners=True)
        if not self.training:
            return main, None
        a = F.dropout2d(self.aux(l3, ds), 0.1, True)
        aux = F.interpolate(self.aux_cls[ds](a), (h, w), mode="bilinear", align_corners=True)
        return main, aux


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=["defaults", "full"], default="defaults")
    ap.add_argument("--what", choices=["train", "eval", "both"], default="both")
    ap.add_argument("--iters", type=int, default=10, help="timed iterations (after 2 warm-up ones)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    width, size, batch = {"defaults": (0.25, 96, 4), "full": (1.0, 256, 2)}[args.shape]
    classes = [8, 5]
    model = PspNet(width, classes)
    # NHWC, as cdcl stores activations; PyTorch picks its fastest oneDNN path for it.
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    data = []
    for ds, c in enumerate(classes):
        x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
        y = torch.randint(0, c, (batch, size, size))
        data.append((ds, x, y))

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for ds, x, y in data:
            main, aux = model(x, ds)
            total = total + F.cross_entropy(main, y, ignore_index=255) + 0.4 * F.cross_entropy(
                aux, y, ignore_index=255
            )
        total.backward()
        opt.step()

    def eval_forward():
        model.eval()
        with torch.no_grad():
            ds, x, _ = data[0]
            main, _ = model(x, ds)
            main.argmax(1)

    for what, fn in [("train", train_step), ("eval", eval_forward)]:
        if args.what not in (what, "both"):
            continue
        for _ in range(2):
            fn()
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        print(f"torch {args.shape} {what} {med:.4f} [{' '.join(f'{t:.4f}' for t in times)}]", flush=True)


if __name__ == "__main__":
    main()
