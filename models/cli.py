"""``fedcbir models ...`` subcommands (no framework is imported until a command runs)."""
from __future__ import annotations

import argparse

from common.errors import FedcbirError
from common.io import print_json


def _spec_from_args(args):
    from models.spec import DEFAULT_ARCH, preset

    kw = {}
    if getattr(args, "width", None) is not None:
        kw["width"] = args.width
    if getattr(args, "size", None) is not None:
        kw["input_size"] = args.size
    if getattr(args, "embedding_dim", None) is not None:
        kw["embedding_dim"] = args.embedding_dim
    if getattr(args, "num_types", None) is not None:
        kw["num_types"] = args.num_types
    arch = getattr(args, "arch", None) or DEFAULT_ARCH
    if getattr(args, "blocks", None) is not None:
        from models.spec import MOBILENET_V3_SMALL

        if arch != "mobilenetv3-small":
            raise FedcbirError("--blocks works with --arch mobilenetv3-small only")
        if not 1 <= args.blocks <= len(MOBILENET_V3_SMALL):
            raise FedcbirError(f"--blocks must be between 1 and {len(MOBILENET_V3_SMALL)}")
        kw["blocks"] = MOBILENET_V3_SMALL[:args.blocks]
    return preset(arch, **kw)


def _train_from(args, spec) -> int:
    v = getattr(args, "train_from", None)
    return spec.default_train_from if v is None else int(v)


def _add_spec_args(p, num_types_default=None):
    from models.spec import DEFAULT_ARCH, PRESETS

    p.add_argument("--arch", choices=sorted(PRESETS), default=DEFAULT_ARCH,
                   help=f"architecture (default {DEFAULT_ARCH}: ImageNet-pretrained)")
    p.add_argument("--width", type=float, default=None, help="width multiplier (default 1.0)")
    p.add_argument("--size", type=int, default=None,
                   help="input size in pixels (default: the architecture's, 160 for efficientnet-lite0)")
    p.add_argument("--embedding-dim", type=int, default=None,
                   help="embedding size (default: the architecture's, 256 for efficientnet-lite0)")
    p.add_argument("--num-types", type=int, default=num_types_default,
                   help="product-type head classes (0 = no head)")
    p.add_argument("--blocks", type=int, default=None,
                   help="keep only the first N inverted-residual blocks (quick checks)")


def cmd_info(args) -> int:
    from models import canonical
    from models.spec import flops, resolve

    spec = _spec_from_args(args)
    r = resolve(spec)
    info = {
        "spec": spec.to_dict(),
        "params_trainable": canonical.num_params(spec, trainable_only=True),
        "params_total": canonical.num_params(spec, trainable_only=False),
        "canonical_names": len(canonical.param_names(spec)),
        "bn_layers": sum(1 for n in canonical.param_names(spec) if n.endswith(".running_mean")),
        "forward_flops": flops(spec, 1),
        "train_step_flops_per_image": 3 * flops(spec, 1),
        "feature_dim": r.feature_dim,
        "feature_map": r.feature_hw,
        "embedding_dim": r.embedding_dim,
    }
    if args.json:
        print_json(info)
        return 0
    print(f"architecture      {spec.name}, width {spec.width}, input {spec.input_size}px, "
          f"embedding {spec.embedding_dim}, type classes {spec.num_types}")
    print(f"parameters        {info['params_trainable']:,} trainable, "
          f"{info['params_total']:,} with BN statistics")
    print(f"canonical arrays  {info['canonical_names']} ({info['bn_layers']} BN layers)")
    print(f"forward FLOPs     {info['forward_flops'] / 1e6:.1f} M per image "
          f"(train step ~3x: {info['train_step_flops_per_image'] / 1e6:.1f} M)")
    print(f"features          {r.feature_dim} x {r.feature_hw}x{r.feature_hw} before pooling")
    return 0


def cmd_parity(args) -> int:
    from models import parity

    spec = _spec_from_args(args)
    if args.products < 2 or args.photos < 2:
        raise FedcbirError("--products and --photos must be >= 2")
    batch = None
    if args.catalog:
        batch = parity.catalog_batch(args.catalog, spec, args.products, args.photos, args.seed)
    report = parity.run_parity(spec, seed=args.seed, products=args.products,
                               photos=args.photos, prox_mu=args.prox_mu,
                               threads=args.threads, batch=batch, train_from=_train_from(args, spec))
    if args.json:
        print_json(report)
    else:
        print(f"spec: {spec.name}, width {spec.width}, {spec.input_size}px, {spec.num_types} type "
              f"classes, trained from block {report['train_from']}; batch {report['batch']}; "
              f"embeddings up to {report['embedding_max_abs']:.3g}")
        print(f"{'max |diff|':24s} {'torch-tf':>11s} {'torch-jax':>11s} {'tf-jax':>11s}  goal")
        d = report["eval_max_abs_diff"]
        print(f"{'eval (raw embedding)':24s} {d['torch-tf']:11.2e} {d['torch-jax']:11.2e} "
              f"{d['tf-jax']:11.2e}  (reported)")
        rows = [("eval (L2-normalised)", "eval_l2_max_abs_diff", parity.EVAL_GOAL)]
        for k in report:
            if k.startswith("train_step_max_abs_diff"):
                opt = k[len("train_step_max_abs_diff_"):] or report["train_step_optimizer"]
                rows.append((f"train step ({opt})", k, parity.TRAIN_GOAL))
        for label, key, goal in rows:
            d = report[key]
            print(f"{label:24s} {d['torch-tf']:11.2e} {d['torch-jax']:11.2e} "
                  f"{d['tf-jax']:11.2e}  <= {goal:g}")
        print("result:", "OK" if report["ok"] else "OUTSIDE GOALS")
    return 0 if report["ok"] else 1


def register(sub) -> None:
    p = sub.add_parser("models", help="the encoder in PyTorch / Keras / Flax: info, parity",
                       description="The one encoder architecture in three frameworks.")
    msub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    msub.required = True

    pi = msub.add_parser("info", help="parameters, FLOPs, canonical names of the architecture")
    _add_spec_args(pi)
    pi.add_argument("--json", action="store_true", help="print JSON")
    pi.set_defaults(func=cmd_info)

    pp = msub.add_parser(
        "parity", help="check that PyTorch, TF and JAX compute the same function",
        description="Load the same canonical weights into all three frameworks, embed the "
                    "same images and run one identical training step (AdamW, then SGD); "
                    "print max absolute differences. Exit 1 when outside the goals "
                    "(L2-normalised embedding <= 1e-5, train step <= 1e-4).")
    _add_spec_args(pp, num_types_default=5)
    pp.add_argument("--train-from", type=int, default=None, metavar="K",
                    help="train blocks >= K (+ head, projection); default: the architecture's "
                         "(11 for efficientnet-lite0, 0 = everything)")
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--products", type=int, default=8, help="P products per batch (default 8)")
    pp.add_argument("--photos", type=int, default=4, help="K photos per product (default 4)")
    pp.add_argument("--prox-mu", type=float, default=0.1, help="FedProx mu (default 0.1)")
    pp.add_argument("--threads", type=int, default=1, help="threads per framework (default 1)")
    pp.add_argument("--catalog", metavar="ROOT", default=None,
                    help="take the batch from a catalog instead of synthetic images")
    pp.add_argument("--json", action="store_true", help="print JSON")
    pp.set_defaults(func=cmd_parity)


def _standalone(argv=None) -> int:  # python -m models.cli ...
    from common.cli import run

    parser = argparse.ArgumentParser(prog="fedcbir")
    register(parser.add_subparsers(dest="command"))
    return run(parser, argv)


if __name__ == "__main__":
    raise SystemExit(_standalone())
