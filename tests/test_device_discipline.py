"""Device discipline, checked statically: no library function that works on a model or on tensors creates a
new tensor on the default device (the CPU) by accident.

Readers run the notebooks on Colab GPUs, but the tests run on a CPU-only torch, where a tensor created without
`device=` lands on the same device as everything else and nothing fails. On a GPU the same line gives
"Expected all tensors to be on the same device". So every module in llm_from_scratch/ is parsed with `ast`,
and in every function that receives a model, a tensor or a device (by annotation, by parameter name, or as a
method of an `nn.Module`), each call that creates a tensor from nothing (`torch.tensor`, `zeros`, `ones`,
`arange`, `empty`, `full`, `rand*`, `linspace`, `eye`, `randperm`, `torch.Generator`, ...; `*_like` and
`x.new_*` are not counted: they inherit device and dtype) must
  * pass `device=` (not a hard-coded "cpu"), or be moved by a `.to(device)` chained onto it, and
  * for factories whose default dtype is float32 (`zeros`, `ones`, `empty`, `full`, `rand`, `randn`,
    `linspace`, `eye`, ...), also say its dtype (`dtype=`, a chained `.to(dtype)` or `.bool()`/`.long()`/...),
    since a float32 tensor meeting a bfloat16 model is promoted or refused.
Two structural rules exempt a call (each is a property of the code, not of one place):
  * it is the argument of `nn.Parameter(...)` or `self.register_buffer(...)`: it becomes part of the module and
    follows `module.to(device)` / `module.to(dtype)`;
  * `.to(...)` with a device is chained onto it: it is moved as it is made.
Everything else that is flagged must be fixed, or listed in ALLOWLIST with a one-line reason.
"""
import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llm_from_scratch"

# torch.<name>(...) calls that make a new tensor (or a random generator) on the default device.
FACTORIES = {"tensor", "as_tensor", "asarray", "from_numpy", "zeros", "ones", "empty", "full", "arange", "range",
             "linspace", "logspace", "eye", "rand", "randn", "randint", "randperm", "normal", "empty_strided",
             "scalar_tensor", "tril_indices", "triu_indices", "Generator",
             "FloatTensor", "DoubleTensor", "HalfTensor", "BFloat16Tensor", "LongTensor", "IntTensor",
             "ShortTensor", "ByteTensor", "BoolTensor"}
# ... of which these give float32 unless told otherwise: their dtype matters next to a bfloat16 model.
FLOAT_DEFAULT = {"zeros", "ones", "empty", "full", "linspace", "logspace", "eye", "rand", "randn", "normal",
                 "empty_strided", "scalar_tensor"}
# ... and these cannot take a device at all: always the CPU.
CPU_ONLY = {"from_numpy", "FloatTensor", "DoubleTensor", "HalfTensor", "BFloat16Tensor", "LongTensor", "IntTensor",
            "ShortTensor", "ByteTensor", "BoolTensor"}
DTYPE_CASTS = {"float", "double", "half", "bfloat16", "long", "int", "short", "bool", "byte", "char"}
DTYPE_NAMES = {"float16", "float32", "float64", "bfloat16", "half", "float", "double", "int8", "int16", "int32",
               "int64", "long", "int", "short", "uint8", "bool", "complex64", "complex128"}

# A function "receives tensors" if a parameter is annotated with one of these ...
TENSOR_ANNOTATIONS = ("Tensor", "Module", "GPTModel", "device", "KVCache", "Generator", "Optimizer")
# ... or has one of these names (the course's own conventions), or it is a method of an nn.Module.
TENSOR_NAMES = {"model", "net", "module", "device", "idx", "in_idx", "x", "inputs", "input_batch", "target_batch",
                "logits", "probs", "token_ids", "queries", "keys", "values", "q", "k", "v", "mask", "weights",
                "scores", "loss", "tensor", "t", "batch", "cache", "state_dict", "sd", "optimizer"}

# (module, function qualname, factory) -> why creating the tensor there without the inputs' device is right.
ALLOWLIST = {
    ("causal_attention", "causal_attention_weights", "ones"):
        "dtype only (device= is passed): a 0/1 mask that is only read through mask.bool(), never mixed with data",
    ("instruct", "custom_collate_fn", "full"):
        "CPU-only data preparation (a collate function); the batch is moved with .to(device) at its return",
    ("instruct", "custom_collate_fn", "tensor"):
        "CPU-only data preparation (a collate function); the batch is moved with .to(device) at its return",
    ("instruct", "custom_collate_fn", "arange"):
        "CPU-only data preparation (a collate function); the batch is moved with .to(device) at its return",
    ("speed", "matmul_peak_flops", "Generator"):
        "a CPU generator on purpose: the same random matrices on every device; they are moved with .to(device=)",
}


@dataclass(frozen=True)
class Finding:
    module: str
    qualname: str
    factory: str
    line: int
    problem: str

    @property
    def key(self):
        return (self.module, self.qualname, self.factory)

    def __str__(self):
        return f"llm_from_scratch/{self.module}.py:{self.line} in {self.qualname}: torch.{self.factory}(...) {self.problem}"


def _torch_aliases(tree: ast.Module) -> tuple[set, dict]:
    "Names bound to the torch module, and names imported from it (alias -> torch's name)."
    modules, names = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch":
                    modules.add(a.asname or "torch")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = a.name
    return modules, names


def _factory_name(call: ast.Call, modules: set, names: dict) -> str | None:
    f = call.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in modules:
        return f.attr if f.attr in FACTORIES else None
    if isinstance(f, ast.Name) and names.get(f.id) in FACTORIES:
        return names[f.id]
    return None


def _is_cpu_literal(node: ast.AST) -> bool:
    "'cpu', or torch.device('cpu')."
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.split(":")[0] == "cpu"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "device":
        return bool(node.args) and _is_cpu_literal(node.args[0])
    return False


def _is_dtype(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr in DTYPE_NAMES


def _receives_tensors(fn, in_module_class: bool) -> bool:
    if in_module_class:
        return True
    args = fn.args
    for a in args.posonlyargs + args.args + args.kwonlyargs + [x for x in (args.vararg, args.kwarg) if x]:
        if a.arg in TENSOR_NAMES:
            return True
        if a.annotation is not None and any(s in ast.unparse(a.annotation) for s in TENSOR_ANNOTATIONS):
            return True
    return False


def _module_classes(trees: dict) -> set:
    "Names of classes that are nn.Modules: bases named Module, or another such class (across the package)."
    found = {"Module"}
    changed = True
    while changed:
        changed = False
        for tree in trees.values():
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.name not in found:
                    bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", None) for b in node.bases}
                    if bases & found:
                        found.add(node.name)
                        changed = True
    return found


class _Checker(ast.NodeVisitor):
    def __init__(self, module: str, tree: ast.Module, module_classes: set):
        self.module, self.module_classes = module, module_classes
        self.modules, self.names = _torch_aliases(tree)
        self.scopes = []            # (name, kind, receives_tensors)
        self.parents = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
        self.findings = []

    def visit_ClassDef(self, node):
        bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", None) for b in node.bases}
        self.scopes.append((node.name, "class", bool(bases & self.module_classes)))
        self.generic_visit(node)
        self.scopes.pop()

    def _visit_function(self, node):
        in_module_class = bool(self.scopes) and self.scopes[-1][1] == "class" and self.scopes[-1][2]
        self.scopes.append((node.name, "function", _receives_tensors(node, in_module_class)))
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _visit_function

    def _qualname(self):
        return ".".join(name for name, _, _ in self.scopes)

    def _in_module_state(self, node) -> bool:
        "Inside nn.Parameter(...) or register_buffer(...)'s arguments."
        p = self.parents.get(node)
        while p is not None and not isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if isinstance(p, ast.Call):
                f = p.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if name in ("Parameter", "register_buffer", "register_parameter"):
                    return True
            p = self.parents.get(p)
        return False

    def _chain(self, node):
        "Methods called on the new tensor, in order: x.unsqueeze(0).to(device) -> [('unsqueeze', call), ('to', call)]."
        out, cur = [], node
        while True:
            attr = self.parents.get(cur)
            call = self.parents.get(attr) if isinstance(attr, ast.Attribute) else None
            if not (isinstance(attr, ast.Attribute) and attr.value is cur and isinstance(call, ast.Call)
                    and call.func is attr):
                return out
            out.append((attr.attr, call))
            cur = call

    def visit_Call(self, node):
        factory = _factory_name(node, self.modules, self.names)
        if factory and any(receives for _, kind, receives in self.scopes if kind == "function"):
            self._check(node, factory)
        self.generic_visit(node)

    def _check(self, node, factory):
        if self._in_module_state(node):
            return                                             # a parameter or buffer: follows module.to(...)
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        device = kwargs.get("device")
        if factory == "Generator" and device is None and node.args:
            device = node.args[0]
        dtype_ok = "dtype" in kwargs
        moved = False
        for method, call in self._chain(node):
            if method == "to":
                kw = {k.arg: k.value for k in call.keywords if k.arg}
                if "device" in kw and not _is_cpu_literal(kw["device"]):
                    moved = True
                if "dtype" in kw or any(_is_dtype(a) for a in call.args):
                    dtype_ok = True
                if any(not _is_dtype(a) and not _is_cpu_literal(a) for a in call.args):
                    moved = True                               # .to(device) or .to(other_tensor)
            elif method in DTYPE_CASTS:
                dtype_ok = True
        problems = []
        if not moved:
            if device is not None and _is_cpu_literal(device):
                problems.append("hard-codes the CPU (device='cpu')")
            elif factory in CPU_ONLY:
                problems.append("always makes a CPU tensor; chain .to(device)")
            elif device is None:
                problems.append("has no device= (it lands on the CPU, whatever device the inputs are on)")
        if factory in FLOAT_DEFAULT and not dtype_ok:
            problems.append("has no dtype= (float32 by default, whatever dtype the model uses)")
        if problems:
            self.findings.append(Finding(self.module, self._qualname(), factory, node.lineno, "; ".join(problems)))


def check_sources(sources: dict[str, str]) -> list[Finding]:
    "Findings for {module name: source text}, before the allowlist."
    trees = {name: ast.parse(src) for name, src in sources.items()}
    classes = _module_classes(trees)
    findings = []
    for name, tree in trees.items():
        checker = _Checker(name, tree, classes)
        checker.visit(tree)
        findings += checker.findings
    return findings


def package_sources() -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(PACKAGE.glob("*.py")) if p.stem != "_modidx"}


def test_no_tensor_is_made_off_its_inputs_device():
    findings = check_sources(package_sources())
    bad = [f for f in findings if f.key not in ALLOWLIST]
    assert not bad, ("new tensors made without the device (or dtype) of the function's inputs; pass device=x.device "
                     "(and dtype=), chain .to(device), or add an ALLOWLIST entry with a reason:\n"
                     + "\n".join(map(str, bad)))


def test_allowlist_is_current_and_explained():
    found = {f.key for f in check_sources(package_sources())}
    stale = [k for k in ALLOWLIST if k not in found]
    assert not stale, f"ALLOWLIST entries that match nothing any more (remove them): {stale}"
    assert all(isinstance(r, str) and len(r) > 20 and "\n" not in r for r in ALLOWLIST.values())


def test_every_module_is_read():
    sources = package_sources()
    assert {"model", "generate", "kv_cache", "speed", "train", "instruct"} <= set(sources)
    for name, src in sources.items():
        ast.parse(src)                                         # a module the checker cannot parse fails here


# The checker itself must be able to fail: small sources with known answers.
BAD = '''
import torch
from torch import nn

def step(model: nn.Module, idx: torch.Tensor):
    pos = torch.arange(idx.shape[1])                       # 1: no device
    noise = torch.randn(3, device=idx.device)              # 2: no dtype
    g = torch.Generator()                                  # 3: a CPU generator
    ids = torch.tensor([1, 2], device="cpu")               # 4: hard-coded CPU
    half = torch.zeros(4).to(torch.bfloat16)               # 5: cast but not moved
    return pos, noise, g, ids, half

class Block(nn.Module):
    def forward(self, h):
        return h + torch.ones(h.shape[-1])                 # 6: in a module's method, no device nor dtype
'''

GOOD = '''
import torch
from torch import nn

def step(model: nn.Module, idx: torch.Tensor):
    pos = torch.arange(idx.shape[1], device=idx.device)
    noise = torch.randn(3, device=idx.device, dtype=model.w.dtype)
    g = torch.Generator(device=idx.device)
    ids = torch.tensor([1, 2]).unsqueeze(0).to(idx.device)
    mask = torch.ones(3, 3, device=idx.device).bool()
    return pos, noise, g, ids, mask, torch.zeros_like(idx), idx.new_zeros(3)

def text_to_ids(text: str, tokenizer):
    return torch.tensor(tokenizer.encode(text))           # receives no tensors: callers move it

class Block(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))
        self.register_buffer("mask", torch.triu(torch.ones(n, n), diagonal=1))
'''


def test_checker_flags_bad_source():
    found = check_sources({"bad": BAD})
    got = {(f.qualname, f.factory, f.line) for f in found}
    assert got == {("step", "arange", 6), ("step", "randn", 7), ("step", "Generator", 8), ("step", "tensor", 9),
                   ("step", "zeros", 10), ("Block.forward", "ones", 15)}, found
    by_line = {f.line: f.problem for f in found}
    assert "no device=" in by_line[6] and "no dtype=" not in by_line[6]      # arange: ids, dtype by its arguments
    assert "no dtype=" in by_line[7] and "device" not in by_line[7]
    assert "hard-codes the CPU" in by_line[9]
    assert "no device=" in by_line[10] and "no dtype=" not in by_line[10]
    assert "no device=" in by_line[15] and "no dtype=" in by_line[15]


def test_checker_passes_good_source():
    assert check_sources({"good": GOOD}) == []


def test_checker_sees_aliases():
    src = "import torch as th\nfrom torch import zeros as z\ndef f(x: th.Tensor):\n    return th.arange(3), z(2)\n"
    assert [(f.factory, f.line) for f in check_sources({"alias": src})] == [("arange", 4), ("zeros", 4)]


@pytest.mark.parametrize("key", sorted(ALLOWLIST))
def test_allowlisted_places_still_exist(key):
    "Each reason names a real place: the module and function are in the package."
    module, qualname, _ = key
    src = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
    assert f"def {qualname.split('.')[-1]}(" in src
