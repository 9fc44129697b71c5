"""What a benchmark times: one model, optimizer and fixed batch per framework.

MinivitRunner and TorchRunner give the same interface (train_step, infer_step, logits,
gpu_memory, sync), so the timing loop treats both alike.
"""

import numpy as np

import minivit
import minivit.functional as F
from minivit import backend, cuda
from minivit.models import model_from_config
from minivit.optim import AdamW
from minivit.tensor import no_grad
from minivit.torch_reference import reference_swin, reference_vit


class MinivitRunner:
    """A model, an AdamW optimizer and one fixed random batch; train_step() / infer_step()."""

    name = "minivit"

    def __init__(self, model_args, batch, dtype="float32", seed=0, full_last_block=False,
                 cuda_graph=False):
        self.backend = backend.get_backend()
        minivit.manual_seed(seed)
        self.model = model_from_config(model_args).to(dtype=dtype)
        self.model.full_last_block = full_last_block
        self.optimizer = AdamW(self.model.named_parameters(), lr=1e-4, weight_decay=0.05)
        rng = np.random.default_rng(seed)
        size, chans = model_args["img_size"], model_args["in_chans"]
        self.images = rng.standard_normal((batch, chans, size, size)).astype(dtype)
        self.labels = rng.integers(0, model_args["num_classes"], batch)
        self.x = backend.to_backend(self.images)
        self.y = backend.to_backend(self.labels)
        self.cuda_graph, self.graphs = cuda_graph, {}  # mode -> cuda.CapturedStep

    def sync(self):
        if self.backend == "cupy":
            cuda.synchronize()

    def _train(self):
        self.model.train()
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def _infer(self):
        self.model.eval()
        with no_grad():
            self.model(self.x)

    def _step(self, mode, body):
        """body() eagerly, or with cuda_graph its CUDA graph (recorded on the first call)."""
        if self.cuda_graph:
            if mode not in self.graphs:
                self.graphs[mode] = cuda.capture_step(body)
            self.graphs[mode]()
        else:
            body()
        self.sync()

    def train_step(self):
        self._step("train", self._train)

    def infer_step(self):
        self._step("infer", self._infer)

    def logits(self):
        self.model.eval()
        with no_grad():
            return np.asarray(backend.to_numpy(self.model(self.x).data), dtype=np.float64)

    def gpu_memory(self, step):
        """GPU memory over one call of step(): the peak of bytes in use (arrays alive, as
        torch.cuda.max_memory_allocated counts) and what CuPy's pool then holds (freed blocks
        it keeps for reuse included, as torch.cuda.max_memory_reserved counts). With CUDA
        graphs, of the same step run eagerly (a graph's memory is a pool of its own)."""
        if self.cuda_graph:
            body = self._train if step == self.train_step else self._infer
            step = lambda: (body(), self.sync())  # noqa: E731
        cuda.free_memory()
        with cuda.PeakMemory() as peak:
            step()
        return {"peak_gpu_bytes": peak.bytes, "gpu_pool_bytes": cuda.memory_info()["held"]}


class TorchRunner:
    """The PyTorch reference (minivit.torch_reference; timm's own for a Swin) with minivit's
    weights, a torch.optim.AdamW and the same batch; train_step() / infer_step() as
    MinivitRunner's."""

    name = "torch"

    def __init__(self, torch, model_args, state_dict, images, labels, device="cpu",
                 dtype="float32"):
        self.torch, self.device = torch, device
        torch_dtype = getattr(torch, dtype)
        reference = reference_swin if "depths" in model_args else reference_vit
        self.model = reference(model_args).to(device=device, dtype=torch_dtype)
        self.model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                                    for k, v in state_dict.items()})
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.05)
        self.x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)

    def sync(self):
        if self.device != "cpu":
            self.torch.cuda.synchronize()

    def train_step(self):
        self.model.train()
        loss = self.torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.sync()

    def infer_step(self):
        self.model.eval()
        with self.torch.no_grad():
            self.model(self.x)
        self.sync()

    def logits(self):
        self.model.eval()
        with self.torch.no_grad():
            return self.model(self.x).double().cpu().numpy()

    def gpu_memory(self, step):
        """The peak of allocated and of reserved GPU bytes over one call of step()."""
        cuda = self.torch.cuda
        cuda.empty_cache()
        cuda.reset_peak_memory_stats()
        step()
        return {"peak_gpu_bytes": int(cuda.max_memory_allocated()),
                "gpu_pool_bytes": int(cuda.max_memory_reserved())}
