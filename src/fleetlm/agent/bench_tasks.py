"""The agent benchmark's tasks: seeded multi-step tasks on the confined tools (files, SQLite, calculator).

Each `AgentTask` is plain data: files to put in a fresh workspace, SQL that seeds its database
(`data.sqlite`, what the `sqlite` tool opens), the prompt, the tool groups it needs, the expected answer and
the state it must leave (file contents, query results), and a reference solution (the tool calls that
solve it) that the tests run to show every task is solvable with its tools and its checker is right.
Every family needs at least two tool calls before the answer; seven families, generated round-robin.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

DB_NAME = "data.sqlite"

NAMES = ["Ada", "Bruno", "Chen", "Dara", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemal", "Lena",
         "Mateo", "Nadia", "Oskar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wang", "Yara",
         "Zoltan", "Amira", "Boris", "Carla", "Dmitri", "Emma"]
DEPTS = ["sales", "research", "support", "finance", "legal"]
ITEMS = ["apples", "bolts", "cables", "lamps", "nails", "paper", "pens", "screws", "tape", "wire"]
PRODUCTS = ["anvil", "bucket", "chisel", "drill", "easel", "funnel", "gauge", "hammer", "ladder", "mallet",
            "pliers", "rake", "saw", "trowel", "wrench"]


@dataclass
class AgentTask:
    id: str
    family: str
    prompt: str
    tools: list[str]                 # built-in tool groups (fleetlm.agent.tools.builtin_tools)
    answer: str                      # the expected final answer
    answer_kind: str = "number"      # "number" (the answer's last number, within a cent) or "text"
    files: dict[str, str] = field(default_factory=dict)           # written into the workspace first
    sql: list[str] = field(default_factory=list)                  # run on data.sqlite first
    expect_files: dict[str, str] = field(default_factory=dict)    # path -> content the run must leave
    expect_sql: list[tuple[str, list]] = field(default_factory=list)  # query -> rows it must return
    solution: list[tuple[str, dict]] = field(default_factory=list)  # reference tool calls, then the answer

    def prepare(self, workspace: str | Path) -> Path:
        """Write the task's files and seed its database in `workspace` (created if missing)."""
        ws = Path(workspace)
        ws.mkdir(parents=True, exist_ok=True)
        for rel, text in self.files.items():
            path = ws / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        if self.sql:
            conn = sqlite3.connect(ws / DB_NAME)
            try:
                for statement in self.sql:
                    conn.execute(statement)
                conn.commit()
            finally:
                conn.close()
        return ws

    def check(self, answer: str | None, workspace: str | Path) -> tuple[bool, str]:
        """(passed, why not) for a run's final answer and the workspace it left."""
        if answer is None:
            return False, "no answer"
        if self.answer_kind == "number":
            got = last_number(answer)
            if got is None or not _close(got, float(self.answer)):
                return False, f"answer {answer[:80]!r}, expected {self.answer}"
        elif not _same_text(answer, self.answer):
            return False, f"answer {answer[:80]!r}, expected {self.answer!r}"
        ws = Path(workspace)
        for rel, expected in self.expect_files.items():
            path = ws / rel
            if not path.is_file():
                return False, f"{rel} was not written"
            text = path.read_text(errors="replace")
            if re.fullmatch(r"-?\d+(\.\d+)?", expected.strip()):  # a number: 1234.5 and 1234.50 are the same
                same = _close(last_number(text), float(expected))
            else:
                same = _same_text(text, expected)
            if not same:
                return False, f"{rel} holds {text[:60]!r}, expected {expected!r}"
        for query, rows in self.expect_sql:
            got_rows = _query(ws / DB_NAME, query)
            if got_rows != [list(r) for r in rows]:
                return False, f"{query} gave {got_rows[:5]}, expected {rows[:5]}"
        return True, ""

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def last_number(text: str | None) -> float | None:
    """The last number in a text, thousands commas allowed: "Total: $1,234.50." -> 1234.5."""
    if text is None:
        return None
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+", str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _close(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 0.005 + 1e-9 * abs(b)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[\"'`.,:;!*]", " ", str(text)).lower().split())


def _same_text(answer: str, expected: str) -> bool:
    """Equal once case, quotes and punctuation are dropped, or the expected words stand alone in it."""
    a, e = _norm(answer), _norm(expected)
    return a == e or re.search(rf"(^| ){re.escape(e)}( |$)", a) is not None


def _query(db: Path, query: str) -> list[list]:
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [list(r) for r in conn.execute(query).fetchall()]
    except sqlite3.Error:
        return []
    finally:
        conn.close()


def _number(x: float) -> str:
    """A number as the calculator prints it to a cent: 12, 12.5, 12.34."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _sql_text(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _employees(rng: random.Random, n: int) -> list[tuple[str, str, int]]:
    names = rng.sample(NAMES, n)
    salaries = rng.sample(range(2500, 9000, 50), n)  # distinct, so "the highest" is one person
    depts = [DEPTS[i % len(DEPTS)] for i in range(n)]
    rng.shuffle(depts)
    return list(zip(names, depts, salaries, strict=True))


def _employee_sql(rows: list[tuple[str, str, int]]) -> list[str]:
    values = ", ".join(f"({_sql_text(n)}, {_sql_text(d)}, {s})" for n, d, s in rows)
    return ["CREATE TABLE employees (name TEXT PRIMARY KEY, dept TEXT, salary INTEGER)",
            f"INSERT INTO employees VALUES {values}"]


def _products(rng: random.Random, n: int) -> list[tuple[str, float, int]]:
    names = rng.sample(PRODUCTS, n)
    return [(p, round(rng.uniform(2, 90), 2), rng.randint(5, 200)) for p in names]


def _product_sql(rows: list[tuple[str, float, int]]) -> list[str]:
    values = ", ".join(f"({_sql_text(n)}, {p}, {s})" for n, p, s in rows)
    return ["CREATE TABLE products (name TEXT PRIMARY KEY, price REAL, stock INTEGER)",
            f"INSERT INTO products VALUES {values}"]


# ---------------------------------------------------------------- the families


def invoice_total(rng: random.Random, tid: str) -> AgentTask:
    items = rng.sample(ITEMS, rng.randint(3, 5))
    lines = [(item, rng.randint(1, 12), round(rng.uniform(0.5, 40), 2)) for item in items]
    path = f"invoices/inv-{rng.randint(100, 999)}.txt"
    text = "item, quantity, unit price\n" + "".join(f"{i}, {q}, {p}\n" for i, q, p in lines)
    expression = " + ".join(f"{q} * {p}" for _, q, p in lines)
    total = round(sum(q * p for _, q, p in lines), 2)
    prompt = (f"The file {path} in the workspace lists the lines of an invoice. What is the invoice's "
              "total (the sum of quantity times unit price over its lines)? Answer with the number only.")
    return AgentTask(tid, "invoice_total", prompt, ["files", "calculator"], _number(total),
                     files={path: text},
                     solution=[("read_file", {"path": path}), ("calculator", {"expression": expression})])


def dept_payroll(rng: random.Random, tid: str) -> AgentTask:
    rows = _employees(rng, rng.randint(8, 14))
    dept = rng.choice(sorted({d for _, d, _ in rows}))
    monthly = sum(s for _, d, s in rows if d == dept)
    prompt = (f"The employees table in the SQLite database holds monthly salaries. What does the {dept} "
              "department cost per year (the sum of its monthly salaries times 12)? Answer with the number.")
    query = f"SELECT SUM(salary) FROM employees WHERE dept = '{dept}'"
    return AgentTask(tid, "dept_payroll", prompt, ["sqlite", "calculator"], str(monthly * 12),
                     sql=_employee_sql(rows),
                     solution=[("sql", {"query": query}), ("calculator", {"expression": f"{monthly} * 12"})])


def top_earner_to_file(rng: random.Random, tid: str) -> AgentTask:
    rows = _employees(rng, rng.randint(8, 14))
    dept = rng.choice(sorted({d for _, d, _ in rows}))
    top = max((r for r in rows if r[1] == dept), key=lambda r: r[2])[0]
    prompt = (f"In the SQLite database's employees table, find the employee of the {dept} department with "
              "the highest salary. Write only their name to the file report.txt in the workspace, then "
              "answer with the name.")
    query = f"SELECT name FROM employees WHERE dept = '{dept}' ORDER BY salary DESC LIMIT 1"
    return AgentTask(tid, "top_earner_to_file", prompt, ["sqlite", "files"], top, answer_kind="text",
                     sql=_employee_sql(rows), expect_files={"report.txt": top},
                     solution=[("sql", {"query": query}),
                               ("write_file", {"path": "report.txt", "content": top})])


def import_csv(rng: random.Random, tid: str) -> AgentTask:
    people = _employees(rng, rng.randint(10, 16))
    n_new = rng.randint(2, 4)
    existing, new = people[n_new:], people[:n_new]
    dept = rng.choice(sorted({d for _, d, _ in new}))
    count = sum(1 for _, d, _ in people if d == dept)
    csv = "name,dept,salary\n" + "".join(f"{n},{d},{s}\n" for n, d, s in new)
    values = ", ".join(f"('{n}', '{d}', {s})" for n, d, s in new)
    names = sorted(n for n, _, _ in new)
    prompt = ("The file new_hires.csv in the workspace lists new employees. Add every one of them to the "
              "employees table of the SQLite database (columns name, dept, salary), then answer with how "
              f"many employees the {dept} department has now.")
    present = f"SELECT name FROM employees WHERE name IN ({', '.join(map(_sql_text, names))}) ORDER BY name"
    return AgentTask(tid, "import_csv", prompt, ["files", "sqlite"], str(count), files={"new_hires.csv": csv},
                     sql=_employee_sql(existing), expect_sql=[(present, [[n] for n in names])],
                     solution=[("read_file", {"path": "new_hires.csv"}),
                               ("sql", {"query": "INSERT INTO employees (name, dept, salary) "
                                                 f"VALUES {values}"}),
                               ("sql", {"query": f"SELECT COUNT(*) FROM employees WHERE dept = '{dept}'"})])


def file_product(rng: random.Random, tid: str) -> AgentTask:
    a, b = rng.randint(12, 999), round(rng.uniform(1.5, 60), 1)
    product = _number(round(a * b, 2))
    prompt = ("Multiply the number in the file a.txt by the number in the file b.txt (both in the "
              "workspace), write the result to the file c.txt, and answer with the result.")
    return AgentTask(tid, "file_product", prompt, ["files", "calculator"], product,
                     files={"a.txt": f"{a}\n", "b.txt": f"{b}\n"}, expect_files={"c.txt": product},
                     solution=[("read_file", {"path": "a.txt"}), ("read_file", {"path": "b.txt"}),
                               ("calculator", {"expression": f"{a} * {b}"}),
                               ("write_file", {"path": "c.txt", "content": product})])


def order_total(rng: random.Random, tid: str) -> AgentTask:
    rows = _products(rng, rng.randint(6, 10))
    name, price, _ = rng.choice(rows)
    qty = rng.randint(2, 25)
    prompt = ("The file order.txt in the workspace is an order for one product. Look up that product's "
              "price in the products table of the SQLite database and answer with the order's total "
              "(quantity times price).")
    total = _number(round(qty * price, 2))
    return AgentTask(tid, "order_total", prompt, ["files", "sqlite", "calculator"], total,
                     files={"order.txt": f"product: {name}\nquantity: {qty}\n"}, sql=_product_sql(rows),
                     solution=[("read_file", {"path": "order.txt"}),
                               ("sql", {"query": f"SELECT price FROM products WHERE name = '{name}'"}),
                               ("calculator", {"expression": f"{qty} * {price}"})])


def restock(rng: random.Random, tid: str) -> AgentTask:
    rows = _products(rng, rng.randint(6, 10))
    name, _, stock = rng.choice(rows)
    qty = rng.randint(1, stock)
    prompt = ("The file order.txt in the workspace is an order for one product that has just shipped. Lower "
              "that product's stock in the products table of the SQLite database by the ordered quantity, "
              "then answer with its new stock.")
    select = f"SELECT stock FROM products WHERE name = '{name}'"
    return AgentTask(tid, "restock", prompt, ["files", "sqlite"], str(stock - qty),
                     files={"order.txt": f"product: {name}\nquantity: {qty}\n"}, sql=_product_sql(rows),
                     expect_sql=[(select, [[stock - qty]]),
                                 ("SELECT SUM(stock) FROM products", [[sum(s for _, _, s in rows) - qty]])],
                     solution=[("read_file", {"path": "order.txt"}),
                               ("sql", {"query": f"UPDATE products SET stock = stock - {qty} "
                                                 f"WHERE name = '{name}'"}),
                               ("sql", {"query": select})])


FAMILIES = {f.__name__: f for f in (invoice_total, dept_payroll, top_earner_to_file, import_csv, file_product,
                                    order_total, restock)}


def generate_tasks(n: int = 140, seed: int = 0, families: list[str] | None = None) -> list[AgentTask]:
    """`n` tasks, the families in turn, each drawn from its own seeded generator (same seed, same tasks)."""
    chosen = families or list(FAMILIES)
    unknown = [f for f in chosen if f not in FAMILIES]
    if unknown:
        from fleetlm.agent.tools import ToolDefinitionError

        raise ToolDefinitionError(f"unknown task families {unknown}; choose from {', '.join(FAMILIES)}")
    tasks = []
    for i in range(n):
        family = chosen[i % len(chosen)]
        rng = random.Random(f"{seed}:{family}:{i}")
        tasks.append(FAMILIES[family](rng, f"{family}-{seed}-{i:04d}"))
    return tasks


def solve(task: AgentTask, workspace: str | Path) -> str:
    """Run the task's reference solution with the real tools in a prepared workspace; returns the answer
    read off the last tool output that computes something (a query's first value or the calculator's)."""
    from fleetlm.agent.tools import builtin_tools, find_tool

    tools = builtin_tools(task.tools, workspace)
    answer = ""
    for name, arguments in task.solution:
        output = find_tool(tools, name).call(arguments)
        if name == "sql" and output.startswith("columns:"):
            rows = [json.loads(line) for line in output.splitlines()[1:-1]]
            answer = str(rows[0][0]) if rows else ""
        elif name in ("calculator", "read_file"):
            answer = output.strip()
    return answer


def dump(tasks: list[AgentTask]) -> str:
    return "\n".join(json.dumps(t.to_dict()) for t in tasks) + "\n"
