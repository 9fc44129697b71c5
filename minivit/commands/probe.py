"""minivit probe: k-NN and linear-probe accuracy of an encoder's frozen features."""

EPILOG = """SOURCE is a run folder of minivit pretrain (MAE: its encoder; DINO: its teacher's
backbone) or minivit train (the model without its head), a checkpoint file, or a weights file
(reference MAE/DINO, timm; give --model and --dataset then). --random probes a freshly
initialised --model instead: the baseline any pretraining must beat.

examples:
  minivit probe runs/mae
  minivit probe runs/dino --pool mean
  minivit probe --random --model vit_digits --dataset digits
"""


def add_parser(subparsers, name, help_text):
    from minivit.commands.common import (add_backend_flags, add_run_data_flags, command_parser,
                                         number)

    p = command_parser(subparsers, name, help_text, EPILOG)
    p.add_argument("source", nargs="?", metavar="SOURCE", help="run folder or weights file")
    p.add_argument("--random", action="store_true", help="a randomly initialised --model")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="the encoder's configuration (default: the run's, or the dataset's "
                        "small model)")
    p.add_argument("--dataset", default=None, help="default: the run's")
    add_run_data_flags(p)
    p.add_argument("--pool", choices=("cls", "mean"), default="cls",
                   help="features: the class token or the mean of the patch tokens")
    p.add_argument("--k", type=number(int, 1), default=20, help="neighbours (default 20)")
    p.add_argument("--temperature", type=number(float, 0, inclusive=False), default=0.07,
                   help="k-NN vote weight exp(similarity / T) (default 0.07)")
    p.add_argument("--linear-epochs", type=number(int, 0), default=100,
                   help="epochs of the linear probe (0: k-NN only; default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random and the linear probe")
    add_backend_flags(p)


def _encoder(args, dataset, dataset_name, loaded):
    """The VisionTransformer (no head) to probe, at the dataset's image size; `loaded`:
    encoder_state(args.source), or None for --random."""
    from minivit import backend
    from minivit.encoders import encoder_config, load_encoder
    from minivit.models import VisionTransformer, model_config
    from minivit.train import DEFAULT_MODELS

    config = None
    if loaded:
        _, info, source = loaded
        config = encoder_config(info, source)
    if config is None or args.model:
        config = model_config(args.model or DEFAULT_MODELS.get(dataset_name, "vit_cifar"))
    config = dict(config, num_classes=0, img_size=dataset.images.shape[2],
                  in_chans=dataset.images.shape[1])
    backend.manual_seed(args.seed)
    model = VisionTransformer(**config)
    if loaded:
        load_encoder(model, args.source, loaded=loaded)
    return model


def run(args):
    import numpy as np

    from minivit.commands.common import apply_backend, run_data_dir
    from minivit.data import load_dataset
    from minivit.encoders import encoder_state
    from minivit.errors import MinivitError
    from minivit.probe import encoder_features, knn_accuracy, linear_probe_accuracy

    if bool(args.source) == bool(args.random):
        raise MinivitError("give one SOURCE (a run folder or weights file) or --random")
    apply_backend(args)
    loaded = encoder_state(args.source) if args.source else None  # read once
    info = loaded[1] if loaded else {}
    dataset_name = args.dataset or info.get("dataset")
    if dataset_name is None:
        raise MinivitError("--dataset is needed: the weights do not say which dataset they "
                           "were trained on")
    data_dir = run_data_dir(args.data_dir, info, dataset_name)
    train = load_dataset(dataset_name, "train", data_dir)
    test = load_dataset(dataset_name, "test", data_dir)
    model = _encoder(args, train, dataset_name, loaded).to(dtype=args.dtype)

    def features(split):
        mean = np.asarray(split.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(split.std, np.float32).reshape(1, -1, 1, 1)
        return encoder_features(model, (split.images - mean) / std, args.pool, dtype=args.dtype)

    train_features, test_features = features(train), features(test)
    what = args.source or f"random {model.config['embed_dim']}-wide encoder"
    knn = knn_accuracy(train_features, train.labels, test_features, test.labels,
                       train.num_classes, args.k, args.temperature)
    print(f"{what} on {dataset_name} ({args.pool} features, {train_features.shape[1]} dims)")
    print(f"k-NN (k={args.k}, T={args.temperature:g}) test accuracy {knn:.4f}")
    if args.linear_epochs:
        linear = linear_probe_accuracy(train_features, train.labels, test_features, test.labels,
                                       train.num_classes, epochs=args.linear_epochs,
                                       seed=args.seed)
        print(f"linear probe ({args.linear_epochs} epochs) test accuracy {linear:.4f}")
    return 0
