"""demo.py: the JSON API, what it refuses, bounded connections, the page in a headless Chromium."""

import base64
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image

import demo


@pytest.fixture(scope="module")
def server(trained_lenet):
    httpd = demo.Server(
        ("127.0.0.1", 0),
        demo.Predictor([trained_lenet[1]], torch.device("cpu")),
        {"127.0.0.1", "localhost"},
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def post(url, body, headers=None):
    request = urllib.request.Request(
        url + "/predict", data=body, method="POST", headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def png(pixels):
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_drawing_gets_the_top_answers_and_the_28x28_input(server):
    canvas = np.full((200, 200), 255, np.uint8)
    canvas[30:170, 95:105] = 0  # a "1"
    status, answer = post(server, png(canvas))
    assert status == 200 and len(answer["predictions"]) == 5 and len(answer["input"]) == 784
    assert sum(p["probability"] for p in answer["predictions"]) <= 1.0001


def test_what_the_page_refuses(server):
    assert post(server, b"not a picture")[0] == 400
    assert (
        post(server, png(np.zeros((50, 50), np.uint8)), {"Host": "attacker.example:8000"})[0] == 421
    )
    assert post(server, b"x" * (demo.MAX_BODY + 1))[0] == 413
    with urllib.request.urlopen(server + "/health", timeout=10) as response:
        assert json.loads(response.read())["models"] == ["lenet"]


def test_slow_clients_hold_a_bounded_number_of_connections_and_are_cut_off(server, monkeypatch):
    host, port = server.removeprefix("http://").split(":")
    slow = [socket.create_connection((host, int(port))) for _ in range(demo.CONNECTIONS + 5)]
    for sock in slow:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\nxx")
    time.sleep(0.5)
    refused = 0
    for sock in slow:  # the ones beyond CONNECTIONS were closed at once
        sock.settimeout(0.2)
        try:
            refused += sock.recv(1) == b""
        except (TimeoutError, ConnectionResetError):
            pass
    assert refused >= 5
    for sock in slow:
        sock.close()
    time.sleep(0.5)
    assert post(server, b"not a picture")[0] == 400  # the server still serves


def webdriver(base, method, path, payload=None):
    """One W3C WebDriver call to chromedriver (the standard library is the client)."""
    request = urllib.request.Request(
        base + path,
        data=json.dumps(payload).encode() if payload is not None else None,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["value"]


def test_drawing_on_the_page_in_a_real_browser_shows_answers_and_the_preview(server, tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail("chromium and chromedriver are required (REQUIRE_BROWSER=1)")
        pytest.skip("no chromium/chromedriver (Debian: apt-get install chromium chromium-driver)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                webdriver(base, "GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        options = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1000,600",
        ]
        session = webdriver(
            base,
            "POST",
            "/session",
            {
                "capabilities": {
                    "alwaysMatch": {
                        "browserName": "chrome",
                        "goog:chromeOptions": {"binary": chromium, "args": options},
                    }
                }
            },
        )
        browser = f"{base}/session/{session['sessionId']}"
        webdriver(browser, "POST", "/url", {"url": server + "/"})
        pad = webdriver(browser, "POST", "/element", {"using": "css selector", "value": "#pad"})
        ink = (
            "return document.getElementById('preview').getContext('2d').getImageData(0, 0, 28, 28)"
            ".data.reduce((a, b) => a + b, 0);"
        )
        blank = webdriver(browser, "POST", "/execute/sync", {"script": ink, "args": []})
        stroke = [(-40, -90), (40, -90), (0, 0), (-30, 90)]  # a 7, from the canvas centre
        actions = [
            {
                "type": "pointerMove",
                "duration": 0,
                "origin": pad,
                "x": stroke[0][0],
                "y": stroke[0][1],
            },
            {"type": "pointerDown", "button": 0},
        ]
        actions += [
            {"type": "pointerMove", "duration": 120, "origin": pad, "x": x, "y": y}
            for x, y in stroke[1:]
        ]
        actions += [{"type": "pointerUp", "button": 0}]
        webdriver(
            browser,
            "POST",
            "/actions",
            {
                "actions": [
                    {
                        "type": "pointer",
                        "id": "pen",
                        "parameters": {"pointerType": "pen"},
                        "actions": actions,
                    }
                ]
            },
        )
        text = ""
        for _ in range(100):
            text = webdriver(
                browser,
                "POST",
                "/execute/sync",
                {"script": "return document.getElementById('results').innerText", "args": []},
            )
            if "%" in text:
                break
            time.sleep(0.1)
        assert text.count("%") == 5, text
        assert (
            webdriver(browser, "POST", "/execute/sync", {"script": ink, "args": []})
            > blank + 255 * 20
        )
        shot = tmp_path / "page.png"
        shot.write_bytes(base64.b64decode(webdriver(browser, "GET", "/screenshot")))
        assert Image.open(shot).size[0] >= 600
    finally:
        process.terminate()
        process.wait(timeout=10)
