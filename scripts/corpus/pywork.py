"""A real Python process with realistic memory: modules, dicts, JSON, sqlite, ASTs.

Writes its pid to the file given as argv[1] when its heap is built, then sleeps until
killed. Deterministic (seeded) so corpora are comparable between runs.
"""
import ast, collections, csv, datetime, decimal, email, fractions, hashlib, heapq, html
import http.client, inspect, io, itertools, json, logging, os, pathlib, pickle, random, re
import sqlite3, statistics, string, sys, textwrap, time, typing, unittest, urllib.parse, uuid, xml.dom.minidom

random.seed(42)
words = [''.join(random.choice(string.ascii_lowercase) for _ in range(random.randint(3, 10))) for _ in range(5000)]
records = [{"id": i, "name": random.choice(words) + " " + random.choice(words), "score": random.random() * 100,
            "tags": random.sample(words, 3), "when": datetime.date(2020, 1, 1) + datetime.timedelta(days=i % 1500)}
           for i in range(300_000)]
blob = json.dumps(records[:60_000], default=str)
parsed = json.loads(blob)
db = sqlite3.connect(":memory:")
db.execute("create table t (id integer primary key, name text, score real, tag text)")
db.executemany("insert into t values (?, ?, ?, ?)", ((r["id"], r["name"], r["score"], r["tags"][0]) for r in records))
db.execute("create index t_name on t(name)")
db.commit()
trees = []
for mod in (json, csv, textwrap, statistics, fractions, heapq, html, inspect):
    try:
        trees.append(ast.parse(inspect.getsource(mod)))
    except (OSError, TypeError):
        pass
counts = collections.Counter(w for r in records for w in r["tags"])
with open(sys.argv[1], "w") as f:
    f.write(str(os.getpid()))
time.sleep(3600)
