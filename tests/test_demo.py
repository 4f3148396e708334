"""demo.py: the JSON API on real digits, bad requests, and the page in a real headless Chromium."""
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image

import demo
from conftest import real_data
from data import load_images

# .ci/run installs Chromium and sets this, so that CI fails instead of skipping the browser test
REQUIRE_BROWSER = os.environ.get("REQUIRE_BROWSER") == "1"


@pytest.fixture(scope="module")
def mnist_lenet(tmp_path_factory, mnist_sample):
    """A LeNet trained on 2,000 real MNIST training images."""
    import train

    workdir = tmp_path_factory.mktemp("demo")
    train.main(["--model", "lenet", "--dataset", "mnist", "--data-dir", str(mnist_sample), "--no-download",
                "--epochs", "12", "--lr", "0.05", "--hub", str(workdir / "hub"), "--outputs", str(workdir / "out")])
    return workdir / "hub" / "pre_trained" / "lenet.pth"


@pytest.fixture(scope="module")
def server(mnist_lenet):
    predictor = demo.Predictor([(mnist_lenet, None)], torch.device("cpu"),
                               demo.choose_precision("fp32", torch.device("cpu")))
    httpd = demo.make_server(predictor, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def post(url, body, headers=None):
    request = urllib.request.Request(url + "/predict", data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def png(pixels):
    buffer = BytesIO()
    Image.fromarray(pixels).resize((140, 140), Image.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def test_real_digits_are_read_correctly_through_the_api(server):
    images, labels = load_images("mnist", train=False, data_dir=real_data(), download=False)
    chosen = np.random.default_rng(0).choice(len(labels), 40, replace=False)
    with ThreadPoolExecutor(8) as pool:  # concurrent requests
        answers = list(pool.map(lambda i: post(server, png(255 - images[i].numpy())), chosen))  # ink on paper
    assert all(status == 200 for status, _ in answers)
    right = sum(answer["predictions"][0]["label"] == str(int(labels[i])) for i, (_, answer) in zip(chosen, answers))
    assert right >= 32  # 40 real MNIST test digits, drawn dark on light like a user would
    first = answers[0][1]
    assert len(first["predictions"]) == 5 and len(first["input"]) == 784
    assert abs(sum(p["probability"] for p in first["predictions"]) - 1) < 0.05


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(server, mnist_lenet):
    assert post(server, b"not a picture")[0] == 400
    assert post(server, b"")[0] == 400
    assert post(server, png(np.full((28, 28), 255, np.uint8)))[1]["error"].endswith("one handwritten character")
    status, answer = post(server, b"x" * (demo.MAX_BODY + 1))
    assert status == 413 and "limit" in answer["error"]
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(server + "/nothing", timeout=10)
    assert missing.value.code == 404
    with urllib.request.urlopen(server + "/health", timeout=10) as response:
        health = json.loads(response.read())
        assert health["status"] == "ok" and health["models"] == ["lenet"]
        source = health["checkpoints"]["lenet"]
        assert source["path"] == str(mnist_lenet) and source["dataset"] == "mnist" and source["written"]


def test_several_networks_answer_side_by_side_with_an_ensemble(mnist_lenet, mnist_sample, tmp_path):
    import train

    train.main(["--model", "spinalnet", "--dataset", "mnist", "--data-dir", str(mnist_sample), "--no-download",
                "--epochs", "1", "--hub", str(tmp_path / "hub"), "--outputs", str(tmp_path / "out")])
    cpu = torch.device("cpu")
    spinalnet = tmp_path / "hub" / "pre_trained" / "spinalnet.pth"
    predictor = demo.Predictor([(mnist_lenet, None), (spinalnet, None)], cpu, demo.choose_precision("fp32", cpu))
    images, _ = load_images("mnist", train=False, data_dir=real_data(), download=False)
    answer = predictor.predict(png(images[0].numpy()))
    assert list(answer["models"]) == ["lenet", "spinalnet"] and len(answer["predictions"]) == 5
    with pytest.raises(demo.UserError, match="two checkpoints of lenet"):  # never one dropped silently
        demo.Predictor([(mnist_lenet, None), (mnist_lenet, None)], cpu, demo.choose_precision("fp32", cpu))
    with pytest.raises(demo.UserError, match="holds a lenet checkpoint, not resnet"):
        demo.Predictor(demo.checkpoints_to_serve(demo.parse_args(["--model", "resnet", "--ckpt", str(mnist_lenet)])),
                       cpu, demo.choose_precision("fp32", cpu))


def test_huge_or_vanishing_clients_get_an_answer_or_one_line_and_the_server_keeps_serving(server, capfd):
    host, port = server.removeprefix("http://").split(":")
    started = time.time()
    with socket.create_connection((host, int(port)), timeout=10) as client:  # claims 10^20 bytes, sends none
        client.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + str(10 ** 20).encode()
                       + b"\r\n\r\n")
        reply = client.recv(4096)
    assert reply.startswith(b"HTTP/1.0 413") and time.time() - started < 5
    for _ in range(20):  # clients that reset mid-request or leave before the reply
        client = socket.create_connection((host, int(port)), timeout=10)
        client.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 500\r\n\r\n" + png(
            np.zeros((28, 28), np.uint8))[:100])
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()  # RST
    time.sleep(0.5)
    assert "Traceback" not in capfd.readouterr().err
    with urllib.request.urlopen(server + "/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"


# ----------------------------------------------------------------------------- the page in Chromium

def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def webdriver(base, method, path, payload=None):
    """One W3C WebDriver call to chromedriver (the standard library is the client)."""
    body = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(base + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["value"]


@pytest.fixture
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if REQUIRE_BROWSER:
            pytest.fail("chromium and chromedriver are required (REQUIRE_BROWSER=1)")
        pytest.skip("no chromium/chromedriver here (Debian: apt-get install chromium chromium-driver)")
    port = free_port()
    process = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            webdriver(base, "GET", "/status")
            break
        except OSError:
            time.sleep(0.1)
    options = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--window-size=1000,600"]
    session = webdriver(base, "POST", "/session", {"capabilities": {"alwaysMatch": {
        "browserName": "chrome", "goog:chromeOptions": {"binary": chromium, "args": options}}}})
    yield f"{base}/session/{session['sessionId']}"
    try:
        webdriver(base, "DELETE", f"/session/{session['sessionId']}")
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_drawing_on_the_page_shows_predictions_and_the_preview(server, browser, tmp_path):
    webdriver(browser, "POST", "/url", {"url": server + "/"})
    pad = webdriver(browser, "POST", "/element", {"using": "css selector", "value": "#pad"})
    preview_sum = "const c = document.getElementById('preview').getContext('2d');" \
                  "return c.getImageData(0, 0, 28, 28).data.reduce((a, b) => a + b, 0);"
    blank = webdriver(browser, "POST", "/execute/sync", {"script": preview_sum, "args": []})
    stroke = [(-40, -90), (40, -90), (0, 0), (-30, 90)]  # a 7, relative to the canvas centre
    actions = [{"type": "pointerMove", "duration": 0, "origin": pad, "x": stroke[0][0], "y": stroke[0][1]},
               {"type": "pointerDown", "button": 0}]
    actions += [{"type": "pointerMove", "duration": 120, "origin": pad, "x": x, "y": y} for x, y in stroke[1:]]
    actions += [{"type": "pointerUp", "button": 0}]
    webdriver(browser, "POST", "/actions", {"actions": [{"type": "pointer", "id": "pen",
                                                          "parameters": {"pointerType": "pen"}, "actions": actions}]})
    text = ""
    for _ in range(100):
        text = webdriver(browser, "POST", "/execute/sync",
                         {"script": "return document.getElementById('results').innerText", "args": []})
        if "%" in text:
            break
        time.sleep(0.1)
    assert "prediction" in text and text.count("%") == 5
    drawn = webdriver(browser, "POST", "/execute/sync", {"script": preview_sum, "args": []})
    assert drawn > blank + 255 * 20  # the 28x28 preview now shows ink
    screenshot = webdriver(browser, "GET", "/screenshot")
    import base64

    target = os.environ.get("DEMO_SCREENSHOT") or str(tmp_path / "demo.png")
    with open(target, "wb") as handle:
        handle.write(base64.b64decode(screenshot))
    assert Image.open(target).size[0] >= 600
    webdriver(browser, "POST", "/element/" + next(iter(webdriver(browser, "POST", "/element", {
        "using": "css selector", "value": "#clear"}).values())) + "/click", {})
    cleared = webdriver(browser, "POST", "/execute/sync", {"script": preview_sum, "args": []})
    assert cleared == blank


def test_a_foreign_host_header_gets_421_and_decoding_is_bounded(server, monkeypatch):
    status, answer = post(server, png(np.zeros((28, 28), np.uint8)), headers={"Host": "attacker.example:8000"})
    assert status == 421 and "not Host attacker.example:8000" in answer["error"]
    port = server.rsplit(":", 1)[1]
    assert post(server, b"x", headers={"Host": f"localhost:{port}"})[0] == 400  # loopback names are this server
    with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as client:  # no Host at all
        client.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        assert client.recv(4096).startswith(b"HTTP/1.0 421")
    monkeypatch.setattr(demo, "BUSY_WAIT", 0.2)
    busy = demo.make_server(None, "127.0.0.1", 0)
    assert busy.allowed_hosts >= {"127.0.0.1", "localhost"} and demo.make_server(None, "0.0.0.0", 0).allowed_hosts \
        is None
    busy.server_close()


def test_every_decoder_busy_is_503_not_an_unbounded_pile(mnist_lenet, monkeypatch):
    cpu = torch.device("cpu")
    predictor = demo.Predictor([(mnist_lenet, None)], cpu, demo.choose_precision("fp32", cpu))
    monkeypatch.setattr(demo, "BUSY_WAIT", 0.2)
    httpd = demo.make_server(predictor, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        for _ in range(demo.DECODERS):
            httpd.decoders.acquire()  # every decoder taken by pictures still being read
        status, answer = post(url, png(np.zeros((28, 28), np.uint8)))
        assert status == 503 and "try again" in answer["error"]
        httpd.decoders.release()
        assert post(url, b"not a picture")[0] == 400  # a free decoder answers again
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_an_empty_host_is_refused_and_any_other_than_loopback_is_announced(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(["--model", "lenet", "--host", ""])
    assert exit_info.value.code == 2 and "--host is empty" in capsys.readouterr().err
    assert demo.is_loopback("127.0.0.1") and demo.is_loopback("::1") and demo.is_loopback("localhost")
    assert not demo.is_loopback("0.0.0.0") and not demo.is_loopback("0") and not demo.is_loopback("192.168.1.5")
    assert demo.is_wildcard("0.0.0.0") and demo.is_wildcard("0") and demo.is_wildcard("::")


def test_a_speck_of_ink_is_no_character_and_a_missing_page_stops_the_demo(tmp_path, monkeypatch, mnist_lenet):
    from evaluate import prepare_user_image
    from runs import DataError, UserError

    for size, dot in [(200, 3), (64, 4), (1000, 30)]:
        picture = np.full((size, size), 255, dtype=np.uint8)
        picture[size // 2 : size // 2 + dot, size // 3 : size // 3 + dot] = 0
        Image.fromarray(picture).save(tmp_path / "dot.png")
        with pytest.raises(DataError, match="speck of ink"):
            prepare_user_image(tmp_path / "dot.png")
    picture = np.full((200, 200), 255, dtype=np.uint8)
    picture[40:160, 95:105] = 0  # a stroke: a "1" or an "l"
    Image.fromarray(picture).save(tmp_path / "one.png")
    assert prepare_user_image(tmp_path / "one.png").max() == 255
    monkeypatch.setattr(demo, "PAGE", tmp_path / "missing.html")
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="drawing page"):
        demo.Predictor([(mnist_lenet, None)], cpu, demo.choose_precision("fp32", cpu))
