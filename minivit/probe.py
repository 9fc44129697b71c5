"""How good are an encoder's frozen features? k-NN and linear-probe accuracy.

k-NN as DINO's evaluation (eval_knn.py): L2-normalised features, cosine similarity of each
test image to every training image, the k = 20 most similar vote for their class with weight
exp(similarity / 0.07). The linear probe trains one linear layer (AdamW, cross-entropy) on the
frozen features, standardised per dimension with the training set's mean and deviation (MAE's
probe puts a BatchNorm without affine parameters there; the same map on frozen features).
"""

import numpy as np

import minivit.functional as F
from minivit import backend
from minivit.errors import MinivitError
from minivit.nn import Linear
from minivit.optim import AdamW
from minivit.tensor import no_grad


def encoder_features(model, images, pool="cls", batch_size=256, dtype="float32"):
    """(N, D) host features of normalised images (N, C, H, W): the final-norm class token
    (pool="cls") or the mean of the patch tokens (pool="mean")."""
    if pool not in ("cls", "mean"):
        raise MinivitError(f"unknown pooling {pool!r}; known: cls, mean")
    model.eval()
    parts = []
    with no_grad():
        for start in range(0, len(images), batch_size):
            x = backend.to_backend(images[start:start + batch_size].astype(dtype))
            tokens = model.forward_features(x, class_token_only=pool == "cls")
            pooled = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(axis=1)
            parts.append(backend.to_numpy(pooled.data))
    return np.concatenate(parts).astype(np.float64)


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes, k=20,
                 temperature=0.07, chunk=512):
    """Accuracy of temperature-weighted k-NN votes over cosine similarity."""
    def unit(f):
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

    train, test = unit(train_features), unit(test_features)
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), chunk):
        similarity = test[start:start + chunk] @ train.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
        votes = np.zeros((len(nearest), num_classes))
        np.add.at(votes, (np.arange(len(nearest))[:, None], train_labels[nearest]), weights)
        correct += int((votes.argmax(axis=1) == test_labels[start:start + chunk]).sum())
    return correct / len(test)


def linear_probe_accuracy(train_features, train_labels, test_features, test_labels, num_classes,
                          epochs=100, lr=1e-2, batch_size=256, seed=0):
    """Test accuracy of a linear classifier trained on standardised frozen features."""
    mean = train_features.mean(axis=0)
    std = train_features.std(axis=0) + 1e-6
    train = backend.to_backend(((train_features - mean) / std).astype(np.float32))
    test = backend.to_backend(((test_features - mean) / std).astype(np.float32))
    labels = backend.to_backend(train_labels)
    backend.manual_seed(seed)
    head = Linear(train.shape[1], num_classes)
    optimizer = AdamW(head.named_parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = backend.to_backend(rng.permutation(len(train_labels)))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(head(train[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with no_grad():
        predicted = backend.to_numpy(head(test).data.argmax(axis=1))
    return float((predicted == test_labels).mean())
