"""What a compiled program executes per device, read off its optimized HLO with loops counted by their trips.

XLA's cost_analysis() counts the body of a while loop once: a scanned stack
of 32 layers, 255 decode steps and 20 accumulated micro-batches all count as
one. Here the compiled module's text (compiled.as_text(), per device after
SPMD partitioning) is walked from its entry computation, and each loop body
is weighted by its trip count, read from the loop: its condition compares a
counter in the loop state with a constant bound (`i < N`, alone or and-ed
with an early exit such as the sampler's "every row has ended"), and its
initial state sets the counter's start. A loop with an early exit counts its
bound: the cost when no row stops early.

Per instruction outside fusions (a fusion counts as one):
  flops   2 x multiply-adds of its dots, convolutions (TPU writes matmuls,
          batched ones too, as convolutions) and GPU matmul library calls, with XLA's rule for windows:
          only kernel positions that meet a real (not padded, not dilated)
          input count. Elementwise work is not counted, as MFU does not.
  bytes   HBM bytes read and written: operands and result, except that a
          slice of an operand counts as the slice and an in-place
          dynamic-update-slice as its update (the KV cache is written a
          slot at a time, not copied).
  seconds max(flops / peak FLOP/s, bytes / HBM bytes/s): the roofline that
          XLA's own optimal_seconds applies per instruction, with the chip's
          rates as the compiler states them (rates(), measured on two probe
          programs, rcfd_jax.targets). Collectives count as their HBM traffic;
          time on the chip-to-chip links is not modelled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

_ITEM_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
         "after-all", "partition-id", "replica-id", "copy-done", "all-gather-done", "all-reduce-done",
         "collective-permute-done", "send-done", "recv-done", "opt-barrier", "iota", "add-dependency"}
_SLICES = {"dynamic-slice", "slice", "gather"}  # ops that read only part of their first operand


@dataclasses.dataclass
class Cost:
  flops: float = 0.0
  bytes_accessed: float = 0.0
  seconds: float = 0.0

  def __add__(self, o: "Cost") -> "Cost":
    return Cost(self.flops + o.flops, self.bytes_accessed + o.bytes_accessed, self.seconds + o.seconds)

  def __mul__(self, k: float) -> "Cost":
    return Cost(self.flops * k, self.bytes_accessed * k, self.seconds * k)


@dataclasses.dataclass
class Inst:
  name: str
  shape: str
  opcode: str
  args: str            # the text between the opcode's parentheses: operands, or a constant's value
  operands: list[str]  # operand names
  attrs: str           # everything after the operands


def _close(s: str, i: int, open_: str = "(", close: str = ")") -> int:
  """Index just past the bracket that closes s[i] (s[i] == open_)."""
  depth = 0
  for j in range(i, len(s)):
    if s[j] == open_:
      depth += 1
    elif s[j] == close:
      depth -= 1
      if depth == 0:
        return j + 1
  return len(s)


def _parse_inst(line: str) -> Inst | None:
  m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith("("):
    end = _close(rest, 0)
  else:
    end = rest.index(" ")
  shape, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  args_end = _close(rest, op.end() - 1)
  args = rest[op.end():args_end - 1]
  return Inst(m.group(1), shape, op.group(1), args, re.findall(r"%([\w.\-]+)", args), rest[args_end:])


def parse(text: str) -> tuple[dict[str, list[Inst]], str]:
  """({computation name: instructions}, entry computation name) of an HLO module's text."""
  comps: dict[str, list[Inst]] = {}
  entry, cur = "", None
  for line in text.splitlines():
    head = re.match(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$", line)
    if head and not line.startswith(" "):
      cur = head.group(2)
      comps[cur] = []
      entry = cur if head.group(1) else entry
    elif line.startswith("}"):
      cur = None
    elif cur is not None:
      inst = _parse_inst(line)
      if inst is not None:
        comps[cur].append(inst)
  return comps, entry


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, dims) of each array in a (possibly tuple) shape string."""
  return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in re.findall(r"([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", shape)
          if t in _ITEM_BYTES]


def nbytes(shape: str) -> float:
  return sum(_ITEM_BYTES[t] * math.prod(d) for t, d in _arrays(shape))


def _dims(shape: str) -> tuple[int, ...]:
  arrays = _arrays(shape)
  return arrays[0][1] if arrays else ()


def _attr(attrs: str, key: str) -> str | None:
  m = re.search(rf"\b{key}=(\{{[^}}]*\}}|[^,\s]+)", attrs)
  return m.group(1) if m else None


def _window_valid(lhs: tuple[int, ...], rhs: tuple[int, ...], out: tuple[int, ...], labels: str,
                  window: str | None) -> tuple[float, int]:
  """(product over spatial dims of the valid (output, kernel) position pairs, rhs input features)."""
  lhs_l, rest = labels.split("_")
  rhs_l, out_l = rest.split("->")
  fields = {}
  for item in (window or "").strip("{}").split():
    key, _, value = item.partition("=")
    fields[key] = value.split("x")
  spatial = sorted(c for c in rhs_l if c.isdigit())
  valid = 1.0
  for n, c in enumerate(spatial):
    get = lambda k, default: int(fields[k][n]) if k in fields else default
    size_in, k_size, o_size = lhs[lhs_l.index(c)], rhs[rhs_l.index(c)], out[out_l.index(c)]
    stride, lhs_dil, rhs_dil = get("stride", 1), get("lhs_dilate", 1), get("rhs_dilate", 1)
    lo = int(fields["pad"][n].split("_")[0]) if "pad" in fields else 0
    span = (size_in - 1) * lhs_dil + 1
    count = 0
    for o in range(o_size):
      for k in range(k_size):
        pos = o * stride + k * rhs_dil - lo
        count += 0 <= pos < span and pos % lhs_dil == 0
    valid *= count / max(o_size, 1)
  return valid, rhs[rhs_l.index("i")]


def inst_flops(inst: Inst, shapes: dict[str, str]) -> float:
  """2 x multiply-adds of one dot or convolution; 0 for anything else."""
  out = _dims(inst.shape)
  if inst.opcode == "dot":
    lhs = _dims(shapes[inst.operands[0]])
    contracting = [int(x) for x in (_attr(inst.attrs, "lhs_contracting_dims") or "{}").strip("{}").split(",") if x]
    return 2.0 * math.prod(out) * math.prod(lhs[i] for i in contracting)
  if inst.opcode == "custom-call" and re.search(r'custom_call_target="[^"]*(gemm|matmul)', inst.attrs):
    lhs = _dims(shapes[inst.operands[0]])  # cuBLAS calls on GPU carry the dot's dimensions in their config
    found = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.attrs)
    contracting = [int(x.strip('" ')) for x in found.group(1).split(",") if x.strip('" ')] if found else []
    return 2.0 * math.prod(_dims(inst.shape)) * math.prod(lhs[i] for i in contracting)
  if inst.opcode == "convolution":
    lhs, rhs = _dims(shapes[inst.operands[0]]), _dims(shapes[inst.operands[1]])
    valid, features = _window_valid(lhs, rhs, out, _attr(inst.attrs, "dim_labels"), _attr(inst.attrs, "window"))
    return 2.0 * math.prod(out) * valid * features
  return 0.0


class Program:
  """One compiled module: per-computation costs with loops weighted by their trips."""

  def __init__(self, text: str, peak_flops: float, hbm_bandwidth: float):
    self.comps, self.entry = parse(text)
    self.shapes = {c: {i.name: i.shape for i in insts} for c, insts in self.comps.items()}
    self.peak, self.bandwidth = peak_flops, hbm_bandwidth
    self.trips: dict[str, int] = {}

  @functools.lru_cache(maxsize=None)
  def fused_flops(self, comp: str) -> float:
    """Matmul FLOPs inside a fused computation (and the fusions it calls)."""
    total = 0.0
    for inst in self.comps[comp]:
      total += inst_flops(inst, self.shapes[comp])
      for callee in self._callees(inst):
        total += self.fused_flops(callee)
    return total

  def _callees(self, inst: Inst) -> list[str]:
    keys = ("calls", "to_apply", "body", "condition", "true_computation", "false_computation")
    names = [v.lstrip("%") for k in keys if (v := _attr(inst.attrs, k))]
    branches = _attr(inst.attrs, "branch_computations")
    if branches:
      names += re.findall(r"%([\w.\-]+)", branches)
    return [n for n in names if n in self.comps]

  def _fusion_bytes(self, inst: Inst) -> float:
    """HBM traffic of a fusion: its result (or in-place update) and what it reads of each operand."""
    comp = _attr(inst.attrs, "calls").lstrip("%")
    body = self.comps[comp]
    by_name = {i.name: i for i in body}
    root = body[-1]
    outputs = [by_name[o] for o in root.operands] if root.opcode == "tuple" else [root]
    total = 0.0
    for out in outputs:  # an in-place update writes (and reads) only its update
      is_update = out.opcode == "dynamic-update-slice"
      total += 2 * nbytes(self.shapes[comp][out.operands[1]]) if is_update else nbytes(out.shape)
    return total + sum(self._read(comp, i.name) for i in body if i.opcode == "parameter")

  @functools.lru_cache(maxsize=None)
  def _users(self, comp: str) -> dict[str, list[Inst]]:
    users: dict[str, list[Inst]] = {}
    for i in self.comps[comp]:
      for o in i.operands:
        users.setdefault(o, []).append(i)
    return users

  def _uses(self, comp: str, name: str) -> list[Inst]:
    return self._users(comp).get(name, [])

  def _read(self, comp: str, name: str) -> float:
    """Bytes a fused computation reads of value `name`: all of it, or only the slices taken of it
    (also through the nested fusions it is passed to); nothing as the buffer of an in-place update."""
    full = nbytes(self.shapes[comp][name])
    total = 0.0
    for u in self._uses(comp, name):
      if u.opcode in _SLICES and u.operands[0] == name:
        total += nbytes(u.shape)
      elif u.opcode == "dynamic-update-slice" and u.operands[0] == name:
        continue  # the buffer of an in-place update: its traffic is the update's
      elif u.opcode == "fusion":
        callee = _attr(u.attrs, "calls").lstrip("%")
        by_index = {int(i.args): i.name for i in self.comps[callee] if i.opcode == "parameter"}
        total += sum(self._read(callee, by_index[k]) for k, o in enumerate(u.operands) if o == name)
      else:
        return full
    return min(total, full) if self._uses(comp, name) else full

  def _inst_cost(self, inst: Inst, comp: str) -> Cost:
    if inst.opcode in _FREE or inst.opcode.endswith("-done"):
      return Cost()
    if inst.opcode == "fusion":
      flops, nbytes_ = self.fused_flops(_attr(inst.attrs, "calls").lstrip("%")), self._fusion_bytes(inst)
    elif inst.opcode == "dynamic-slice":
      flops, nbytes_ = 0.0, 2 * nbytes(inst.shape)
    elif inst.opcode == "dynamic-update-slice":
      flops, nbytes_ = 0.0, 2 * nbytes(self.shapes[comp].get(inst.operands[1], ""))
    elif inst.opcode == "custom-call" and "AllocateBuffer" in inst.attrs:
      return Cost()
    else:
      flops = inst_flops(inst, self.shapes[comp])
      nbytes_ = nbytes(inst.shape) + sum(nbytes(self.shapes[comp].get(o, "")) for o in inst.operands)
    return Cost(flops, nbytes_, max(flops / self.peak, nbytes_ / self.bandwidth))

  def trip_count(self, inst: Inst, comp: str) -> int:
    """Iterations of a while loop: the compiler's known trip count, else its bound minus its
    counter's start (1 if neither can be read)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
    if known:
      return int(known.group(1))
    cond = _attr(inst.attrs, "condition").lstrip("%")
    for index, bound in self._bounds(cond):
      start = self._start(comp, inst.operands[0], index)
      if start is not None:
        return max(bound - start, 0)
    return 1

  def _bounds(self, cond: str):
    """(loop-state index, bound) of each `state[index] < constant` in a loop condition, also
    where the comparison sits inside a fusion."""
    by_name = {i.name: i for i in self.comps[cond]}

    def follow(comp_by, name, outer):
      x = comp_by.get(name)
      while x is not None and x.opcode in ("copy", "bitcast", "convert") and x.operands:
        x = comp_by.get(x.operands[0])
      if x is not None and x.opcode == "parameter" and outer is not None:
        return follow(by_name, outer[int(x.args)], None)
      return x

    sites = [(by_name, i, None) for i in self.comps[cond]]
    for f in self.comps[cond]:
      if f.opcode == "fusion":
        body = self.comps[_attr(f.attrs, "calls").lstrip("%")]
        sites += [({b.name: b for b in body}, b, f.operands) for b in body]
    for comp_by, i, outer in sites:
      if i.opcode != "compare" or "direction=LT" not in i.attrs:
        continue
      a, b = (follow(comp_by, o, outer) for o in i.operands)
      if a is not None and b is not None and a.opcode == "get-tuple-element" and b.opcode == "constant":
        yield int(_attr(a.attrs, "index")), int(b.args)

  def _start(self, comp: str, tuple_name: str, index: int) -> int | None:
    by_name = {i.name: i for i in self.comps[comp]}
    t = by_name.get(tuple_name)
    if t is None or t.opcode != "tuple" or index >= len(t.operands):
      return None
    x = by_name.get(t.operands[index])
    while x is not None and x.opcode in ("copy", "bitcast", "convert") and x.operands:
      x = by_name.get(x.operands[0])
    return int(x.args) if x is not None and x.opcode == "constant" else None

  def cost(self, comp: str | None = None) -> Cost:
    """Executed cost of a computation: each instruction once, each loop body times its trips."""
    comp = comp or self.entry
    total = Cost()
    for inst in self.comps[comp]:
      if inst.opcode == "while":
        trips = self.trip_count(inst, comp)
        self.trips[inst.name] = trips
        total += (self.cost(_attr(inst.attrs, "body").lstrip("%"))
                  + self.cost(_attr(inst.attrs, "condition").lstrip("%"))) * trips
      elif inst.opcode == "conditional":
        branches = self._callees(inst)
        total += max((self.cost(b) for b in branches), key=lambda c: c.seconds, default=Cost())
      elif inst.opcode == "call":
        total += sum((self.cost(c) for c in self._callees(inst)), Cost())
      else:
        total += self._inst_cost(inst, comp)
    return total


def executed(compiled, peak_flops: float, hbm_bandwidth: float) -> Cost:
  """Per-device cost of a compiled program as it executes: loops times their trips (module docstring)."""
  return Program(compiled.as_text(), peak_flops, hbm_bandwidth).cost()
