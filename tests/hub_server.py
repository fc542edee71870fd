"""A real HTTP server on loopback that speaks the part of the Hugging Face Hub's API that `huggingface_hub` uses to
push (read from huggingface_hub 1.33's hf_api.py, _commit_api.py and lfs.py):

- GET  /api/whoami-v2                                    the token's user (401 for any other token)
- GET  /api/agent-harnesses                              an empty registry (the client's user-agent detection, public)
- POST /api/repos/create                                 {"name", "organization", "visibility"} -> {"url"}; 409 if it exists
- POST /api/validate-yaml                                a README's metadata block: YAML mapping, else 400 with errors
- POST /api/models/{repo}/preupload/{revision}           which files go inline ("regular") and which as LFS
- POST /{repo}.git/info/lfs/objects/batch                LFS batch API, basic transfer: an upload and a verify action
- PUT  /lfs/{oid}                                        the object (sha256 and size checked, content not kept)
- POST /lfs/verify                                       the object arrived
- POST /api/models/{repo}/commit/{revision}              NDJSON: header, then "file" lines (base64 content) and
                                                         "lfsFile" lines (an oid uploaded before)

Like the Hub, it answers "lfs" for binary files and files over 10 MB, "regular" otherwise; with hf_xet installed the
client would ask for Xet storage, whose protocol this server does not speak, so tests set HF_HUB_DISABLE_XET=1 (the
client's own switch) to take the LFS path. Every file a commit lands is listed in `files[repo][path]` with its size and
sha256 (`text` too for regular files), every request's Authorization header in `auth`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from contextlib import contextmanager
from http.server import ThreadingHTTPServer

import yaml

from servers import JsonHandler, answering

LFS_THRESHOLD = 10 * 2**20


class FakeHub:
    def __init__(self, token: str, user: str = "tester"):
        self.token, self.user = token, user
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool}
        self.files: dict[str, dict[str, dict]] = {}  # repo id -> path -> {"size", "sha256", "text"?}
        self.lfs: dict[str, int] = {}  # oid -> size, uploaded and verified
        self.commits: list[dict] = []
        self.auth: list[str] = []
        self.refuse_commits_to: str | None = None  # a repo whose commits fail with a 500, as a Hub having a bad moment
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, whether it carried a token), in order
        self.lock = threading.Lock()
        hub = self

        class Handler(JsonHandler):
            protocol_version = "HTTP/1.1"

            def pieces(self):
                """The request body in pieces, as it arrives (Content-Length or chunked)."""
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return
                        yield self.rfile.read(size)
                        self.rfile.readline()
                left = int(self.headers.get("Content-Length") or 0)
                while left:
                    piece = self.rfile.read(min(left, 2**20))
                    left -= len(piece)
                    yield piece

            def body(self) -> bytes:
                return b"".join(self.pieces())

            def authorized(self) -> bool:
                auth = self.headers.get("Authorization", "")
                with hub.lock:
                    hub.auth.append(auth)
                    hub.requests.append((self.command, self.path.split("?")[0], bool(auth)))
                if auth != f"Bearer {hub.token}":
                    self.reply(401, {"error": "Invalid credentials in Authorization header"})
                    return False
                return True

            def repo_of(self, prefix: str, suffix: str) -> str:
                return self.path.split("?")[0][len(prefix) :].rsplit(suffix, 1)[0]

            def do_GET(self):
                if self.path.startswith("/api/agent-harnesses"):  # public: the client's user-agent detection asks for it
                    return self.reply(200, {"standardEnvVars": [], "harnesses": {}})
                if not self.authorized():
                    return
                if self.path.startswith("/api/whoami-v2"):
                    return self.reply(200, {"type": "user", "name": hub.user, "auth": {"accessToken": {"role": "write"}}})
                self.reply(404, {"error": f"no route GET {self.path}"})

            def do_PUT(self):
                digest, size = hashlib.sha256(), 0
                for piece in self.pieces():  # hashed as it streams in, not kept: a merged model is hundreds of MB
                    digest.update(piece)
                    size += len(piece)
                oid = self.path.split("?")[0].removeprefix("/lfs/")
                if digest.hexdigest() != oid:
                    return self.reply(400, {"error": "sha256 mismatch"})
                with hub.lock:
                    hub.lfs[oid] = size
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self):
                raw = self.body()
                path = self.path.split("?")[0]
                if path == "/lfs/verify":
                    info = json.loads(raw)
                    ok = hub.lfs.get(info["oid"]) == info["size"]
                    return self.reply(200 if ok else 404, {"message": "ok" if ok else "object not uploaded"})
                if path.endswith(".git/info/lfs/objects/batch"):
                    if not self.authorized():
                        return
                    request = json.loads(raw)
                    base = f"http://{self.headers['Host']}"
                    objects = [
                        {
                            "oid": o["oid"],
                            "size": o["size"],
                            "authenticated": True,
                            "actions": {"upload": {"href": f"{base}/lfs/{o['oid']}"}, "verify": {"href": f"{base}/lfs/verify"}},
                        }
                        for o in request["objects"]
                    ]
                    return self.reply(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})
                if not self.authorized():
                    return
                if path == "/api/repos/create":
                    request = json.loads(raw)
                    repo = f"{request['organization']}/{request['name']}"
                    with hub.lock:
                        if repo in hub.repos:
                            return self.reply(409, {"error": "You already created this model repo", "url": f"http://{self.headers['Host']}/{repo}"})
                        hub.repos[repo] = {"private": request.get("visibility") == "private", "type": request.get("type") or "model"}
                        hub.files[repo] = {}
                    return self.reply(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    content = json.loads(raw)["content"]
                    try:
                        _, header, _ = content.split("---\n", 2)
                        metadata = yaml.safe_load(header)
                        assert isinstance(metadata, dict)
                    except Exception as e:  # noqa: BLE001 - any failure is the Hub's 400
                        return self.reply(400, {"errors": [{"message": f"invalid metadata: {e}"}]})
                    return self.reply(200, {"errors": [], "warnings": []})
                if path.startswith("/api/models/") and "/preupload/" in path:
                    repo = self.repo_of("/api/models/", "/preupload/")
                    if repo not in hub.repos:
                        return self.reply(404, {"error": "Repository not found"})
                    files = []
                    for f in json.loads(raw)["files"]:
                        sample = base64.b64decode(f["sample"])
                        lfs = f["size"] > LFS_THRESHOLD or b"\0" in sample
                        files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": None})
                    return self.reply(200, {"files": files, "commitOid": "0" * 40})
                if path.startswith("/api/models/") and "/commit/" in path:
                    repo = self.repo_of("/api/models/", "/commit/")
                    if repo not in hub.repos:
                        return self.reply(404, {"error": "Repository not found"})
                    if repo == hub.refuse_commits_to:
                        return self.reply(500, {"error": "Internal Error - We're working hard to fix this as soon as possible!"})
                    landed = {}
                    for line in raw.decode().splitlines():
                        item = json.loads(line)
                        value = item["value"]
                        if item["key"] == "file":
                            data = base64.b64decode(value["content"])
                            landed[value["path"]] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "text": data.decode("utf-8", "replace")}
                        elif item["key"] == "lfsFile":
                            if hub.lfs.get(value["oid"]) != value["size"]:
                                return self.reply(400, {"error": f"LFS object {value['oid']} of {value['path']} was never uploaded"})
                            landed[value["path"]] = {"size": value["size"], "sha256": value["oid"]}
                        elif item["key"] != "header":
                            return self.reply(400, {"error": f"unsupported commit operation {item['key']}"})
                    with hub.lock:
                        hub.files[repo].update(landed)
                        oid = hashlib.sha1(raw).hexdigest()
                        hub.commits.append({"repo": repo, "oid": oid, "paths": sorted(landed)})
                    return self.reply(200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None})
                self.reply(404, {"error": f"no route POST {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@contextmanager
def fake_hub(token: str):
    """A FakeHub answering on loopback while the block runs."""
    hub = FakeHub(token)
    with answering(hub.server):
        yield hub
