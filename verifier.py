"""Verifiable rewards: pull the final answer out of a model response and check it.

Public, stable functions:
    after_thinking(response) -> str            what follows the reasoning (<think> ... </think>), Qwen3-style
    extract_answer(response) -> str | None     the final answer the response commits to
    score(response, ground_truth) -> float     1.0 if it matches the ground truth, else 0.0
    score_countdown(response, numbers, target) a Countdown equation check (data.py's task)
    reward(response, row) -> float             dispatch on a data row (what npo.py calls)

Model outputs are untrusted text: nothing here is `eval`ed. Plain numbers are compared exactly
(fractions) in-process; everything else (LaTeX, sets, intervals, units) goes to math-verify, which
runs in a worker process that is killed and restarted when it exceeds its deadline. That keeps the
time per response bounded even for `10^{10^{10}}`, works from any thread (math-verify's own timeouts
use SIGALRM, which only works on a main thread), and protects training from a crash in sympy.
"""
import ast
import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction

TAIL_CHARS = 10_000      # the final answer sits at the end; a 100k-char response is cut to its tail
MAX_ANSWER_CHARS = 1_000  # a longer "answer" is not an answer
DEADLINE_S = 5.0          # hard wall-clock limit for one math-verify call (worker is killed past it)

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------
_NUMBER = r"(?<![A-Za-z\d])(?:-?\d{1,3}(?: \d{3})+(?!\d)|-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+)"
_MARKERS = [  # the *last* match of the first pattern that matches anywhere wins
    re.compile(r"####\s*([^\n]+)"),                                                 # GSM8K
    re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*:?\s*([^\n]+)", re.I),   # prose
    re.compile(r"(?:^|\n)\s*A:\s*([^\n]+)"),                                     # "Q: .. A: x"
]


def _last_braced(text):
    """Content of the last balanced \\boxed{...} or \\fbox{...} (nested braces allowed), else None.
    Only the last few openings are tried, so unbalanced junk cannot make this quadratic."""
    for m in list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))[-5:][::-1]:
        depth = 1
        for j in range(m.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[m.end():j]
    return None


def _clean(ans):
    ans = ans.strip().strip("$").strip()
    ans = re.sub(r"^\\\(|\\\)$", "", ans).strip()
    ans = re.sub(r"[.\s]+$", "", ans)  # trailing full stop
    return ans


def _marked_answer(text):
    """The answer behind an explicit marker (boxed, <answer>, ####, "answer is", "A:"), else None."""
    boxed = _last_braced(text)
    if boxed is not None:
        return _clean(boxed)
    close = text.rfind("</answer>")
    open_ = text.rfind("<answer>", 0, max(close, 0))
    if close >= 0 and open_ >= 0:
        inner = text[open_ + len("<answer>"):close]
        return _marked_answer(inner) or _clean(inner)
    for pattern in _MARKERS:
        matches = pattern.findall(text)
        if matches:
            return _clean(matches[-1])
    return None


def after_thinking(response):
    """The part of a response after its reasoning. Qwen3-style models write <think> ... </think> and then the
    answer (the tags are ordinary tokens: decoding keeps them); a \\boxed{} inside the reasoning is not an answer,
    and a response cut off inside it (an opening tag, no closing one) has none: ''. Without tags: all of it.
    (A template that opens the reasoning in the prompt leaves a cut-off response with no tag to tell.)"""
    if not isinstance(response, str):
        return response
    close = response.rfind("</think>")
    if close >= 0:
        return response[close + len("</think>"):]
    return "" if "<think>" in response else response


def extract_answer(response):
    """The final answer in `response` (after its reasoning, after_thinking): last \\boxed{}, else last
    <answer>...</answer>, else GSM8K `#### x`, else "answer is x" / "Answer: x" / a line "A: x", else the last
    number. None if the response contains none of these."""
    if not isinstance(response, str):
        return None
    text = after_thinking(response)[-TAIL_CHARS:]
    marked = _marked_answer(text)
    if marked is not None:
        return marked
    numbers = re.findall(_NUMBER, text)
    return _clean(numbers[-1]) if numbers else None


def _as_number(s):
    """Exact value of a plain number ('1,000', '$18', '-0.5', '3/4', '12.'), else None."""
    if s is None or len(s) > 64:
        return None
    t = re.sub(r"\\[$,!; ]|\\text\{\s*\}|[$\s]", "", s)
    t = re.sub(r"(?<=\d),(?=\d{3}(?:\D|$))", "", t)
    t = t.rstrip(".")
    if re.fullmatch(r"-?\d+(?:\.\d+)?|-?\.\d+", t):
        return Fraction(t)
    m = re.fullmatch(r"(-?\d+)/(\d+)", t)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    return None


_CHOICE = re.compile(r"^\(?([A-J])\)?$")
_TEXT_MACRO = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf)\s*\{([^{}]*)\}")
# "the answer is C", "Answer: (C)", "the correct option is (C)", "answer is option C": the last one wins
_CHOICE_PHRASE = re.compile(r"(?i:answer|option|choice)\s*(?:(?i:is)|:|=)?\s*(?:(?i:option|choice)\s*)?"
                            r"\(?([A-J])\)?(?![A-Za-z0-9])")


def _strip_text_macros(s):
    """'\\text{(C)}' -> '(C)': multiple-choice golds and boxed answers are often wrapped in \\text{}."""
    return _TEXT_MACRO.sub(r"\1", s).strip().strip("$").strip()


def _choice_letters(ans):
    """Option letters a response commits to: '(B)', 'B', 'B. 42' -> {'B'}; 'A, C or D' -> 3."""
    letters = re.findall(r"(?<![A-Za-z])\(?([A-J])\)?(?![A-Za-z])", _strip_text_macros(ans))
    return set(letters)


def _choice_answer(tail):
    """The option letters a response commits to, read as models write them: a \\boxed{} answer, else
    the last "answer / option / choice (is) X", else the one letter written as '(X)', else a bare
    short reply ('B', '(B)'). A set: more than one letter is no answer."""
    boxed = _last_braced(tail)
    if boxed is not None:
        return _choice_letters(boxed)
    said = _CHOICE_PHRASE.findall(tail)
    if said:
        return {said[-1]}
    paren = set(re.findall(r"\(([A-J])\)", tail))
    if len(paren) == 1:
        return paren
    short = tail.strip()
    return _choice_letters(short) if len(short) <= 20 else set()


# ---------------------------------------------------------------------------------------------
# Equivalence through math-verify, in a killable worker process
# ---------------------------------------------------------------------------------------------
_worker = None
_worker_lock = threading.Lock()


def _start_worker(startup_s=120.0):
    """Start the worker and wait for its 'ready' line (importing sympy takes seconds: that time
    must not count against the first request's deadline)."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import verifier; verifier._worker_loop()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
    ready, _, _ = select.select([proc.stdout], [], [], startup_s)
    if not ready or proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError("verifier: the math-verify worker did not start (is math-verify installed?)")
    return proc


def _stop_worker():
    global _worker
    if _worker is not None:
        _worker.kill()
        _worker.wait()
        _worker = None


atexit.register(_stop_worker)


def _worker_loop():
    """Runs in the worker: one JSON request per line in, one JSON verdict per line out."""
    from math_verify import parse, verify
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        gold, pred = json.loads(line)
        try:
            ok = verify(parse(gold, parsing_timeout=3), parse(pred, parsing_timeout=3),
                        timeout_seconds=3)
        except Exception:
            ok = False
        sys.stdout.write(json.dumps(bool(ok)) + "\n")
        sys.stdout.flush()


def _math_verify(gold, pred, deadline_s=DEADLINE_S):
    """True if math-verify judges `pred` equal to `gold`; False on mismatch, error or timeout."""
    global _worker
    with _worker_lock:
        for _ in range(2):  # a worker that died between calls is restarted once
            if _worker is None or _worker.poll() is not None:
                _worker = _start_worker()
            try:
                _worker.stdin.write(json.dumps([gold, pred]) + "\n")
                _worker.stdin.flush()
            except (BrokenPipeError, OSError):
                _stop_worker()
                continue
            ready, _, _ = select.select([_worker.stdout], [], [], deadline_s)
            line = _worker.stdout.readline() if ready else ""
            if not line:  # timed out or crashed: kill it, the next call starts a fresh one
                _stop_worker()
                return False
            return json.loads(line) is True
    return False


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------
_LATEX = re.compile(r"\\[A-Za-z]+|\$|\\\(|\\\[")  # any LaTeX command or math delimiter
_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed|\\fbox")  # what math-verify's extraction looks for


def _for_math_verify(text):
    """math-verify extracts LaTeX itself from $...$, \\(...\\), \\[...\\] and \\boxed{}; an answer
    stored without them (bare LaTeX as MATH-style datasets keep golds: '\\sqrt{2}', '2\\pi',
    '[-1, 4)') gets a $\\boxed{}$ anchor, else nothing would be extracted from it."""
    return text if _DELIMITED.search(text) else f"$\\boxed{{{_clean(text)}}}$"


def score(response, ground_truth):
    """1.0 if `response`'s final answer (after its reasoning: after_thinking) equals `ground_truth`, else 0.0.

    `ground_truth` may be a bare answer ('18', '\\frac{1}{3}', 'B') or a worked solution with a
    marker ('... #### 18', '\\boxed{18}'). Plain numbers are compared exactly here; anything else
    goes to math-verify, which sees the LaTeX of the response's tail (so several \\boxed{} answers
    are read as one set, never as "pick the last"). Multiple choice: the response must commit to
    exactly one letter, so listing every option scores 0. Never raises; bounded time for any input.
    """
    if not isinstance(response, str) or ground_truth is None:
        return 0.0
    gt, tail = str(ground_truth), after_thinking(response)[-TAIL_CHARS:]
    gold = _marked_answer(gt) if re.search(r"####|\\boxed|\\fbox|</answer>|(?:^|\n)\s*A:", gt) \
        else _clean(gt)
    has_latex = _LATEX.search(tail) is not None
    # without LaTeX the last number is the answer (extract_answer); with it, math-verify reads it
    pred = extract_answer(tail) if not has_latex else _marked_answer(tail)
    if not gold or (pred is not None and len(pred) > MAX_ANSWER_CHARS):
        return 0.0
    choice = _CHOICE.match(_strip_text_macros(gold))
    if choice:  # multiple choice: the response must commit to exactly that one letter
        return float(_choice_answer(tail) == {choice.group(1)})
    g, p = _as_number(gold), _as_number(pred)
    if g is not None and p is not None and tail.count("\\boxed") <= 1:  # fast path, exact
        return float(g == p)
    if g is not None and not has_latex:  # plain-number gold, plain-text reply: its last number decides
        numbers = re.findall(_NUMBER, pred or "")
        return float(bool(numbers) and _as_number(numbers[-1]) == g)
    gold_text = gt.strip() if _LATEX.search(gt) and not re.search(r"####|(?:^|\n)\s*A:", gt) else gold
    # math-verify reads the response itself where it delimits its math; otherwise the extracted answer
    pred_text = tail if _DELIMITED.search(tail) or pred is None else pred
    return float(_math_verify(_for_math_verify(gold_text), _for_math_verify(pred_text[-2000:])))


def score_countdown(response, numbers, target):
    """1.0 if the response's final answer is an arithmetic expression (+ - * / and parentheses)
    that uses each of `numbers` exactly once and equals `target`. Parsed with `ast`, evaluated
    with exact fractions: nothing is `eval`ed."""
    response = after_thinking(response)
    if not isinstance(response, str) or not response.strip():
        return 0.0
    text = response[-TAIL_CHARS:]
    ans = _marked_answer(text) or text.strip().splitlines()[-1]
    expr = ans.split("=")[0]
    for sym, op in (("\\times", "*"), ("\\cdot", "*"), ("\u00d7", "*"), ("\\div", "/")):
        expr = expr.replace(sym, op)
    if len(expr) > 200 or not re.fullmatch(r"[\d\s+\-*/().]+", expr):
        return 0.0
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        return 0.0
    used = []

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            a, b = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            if b == 0:
                raise ZeroDivisionError
            return a / b
        raise ValueError("not allowed")

    try:
        result = value(tree.body)
    except (ValueError, ZeroDivisionError, RecursionError):
        return 0.0
    return float(sorted(used) == sorted(int(n) for n in numbers) and result == Fraction(target))


def reward(response, row):
    """Reward of one response for one data row (rows come from data.py)."""
    if row.get("task") == "countdown":
        return score_countdown(response, row["numbers"], row["target"])
    return score(response, row["answer"])
