"""Train a tiny ViT on the embedded 8x8 digits through the Python API (no CLI).

    python examples/train_digits.py [--epochs 30]
"""

import argparse

import minivit
import minivit.functional as F
from minivit.data import DataLoader, load_dataset
from minivit.models import create_model
from minivit.optim import AdamW, warmup_cosine
from minivit.train import evaluate

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=30, help="default: %(default)s")
EPOCHS, BATCH, LR = parser.parse_args().epochs, 64, 2e-3

minivit.manual_seed(0)
train_set, test_set = load_dataset("digits", "train"), load_dataset("digits", "test")
train_loader = DataLoader(train_set, BATCH, shuffle=True, seed=0)
test_loader = DataLoader(test_set, 256, shuffle=False)

model = create_model("vit_digits")
optimizer = AdamW(model.named_parameters(), lr=LR, weight_decay=0.05)
total_steps = EPOCHS * len(train_loader)

step = 0
for epoch in range(EPOCHS):
    model.train()
    for images, labels in train_loader:
        optimizer.lr = warmup_cosine(step, total_steps, LR, warmup_steps=len(train_loader))
        loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(max_grad_norm=1.0)
        step += 1
    test_loss, test_accuracy = evaluate(model, test_loader)
    print(f"epoch {epoch + 1:>2}: train loss {loss.item():.3f}  test accuracy {test_accuracy:.3f}")
