"""README's picture of the page: serve.py on the given runs, a headline typed into headless
Chromium, its words and a second text asked for, and the page saved as a PNG.

    python web/screenshot.py --runs runs/readme/lora_r8/seed0 runs/readme/bilstm_attn/seed0 \\
        --out figures/page.png

Needs selenium (requirements-dev.txt) and Debian's chromium and chromium-driver.
"""
import argparse
import shutil
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import serve  # noqa: E402

TEXT_A = "Oracle shares rise as quarterly profit beats forecasts on strong software sales"
TEXT_B = "Oracle unveils new database software that runs faster on cheaper servers"


def headless_chromium(*flags):
    """Debian's chromium through Selenium, headless; RuntimeError saying what is missing where it
    cannot start (tests/test_serve.py skips on it)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise RuntimeError("pip install selenium") from None
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        raise RuntimeError("no chromium/chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 *flags):
        options.add_argument(flag)
    options.binary_location = chromium
    return webdriver.Chrome(options=options, service=Service(driver))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--out", default="figures/page.png")
    args = parser.parse_args()
    from selenium.webdriver.support.ui import WebDriverWait

    serve.Handler.lab = serve.Lab([Path(run) for run in args.runs], "cpu")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), serve.Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    page = headless_chromium("--window-size=1000,1250")
    try:
        page.get(f"http://127.0.0.1:{httpd.server_address[1]}/")
        wait = WebDriverWait(page, 120)
        wait.until(lambda p: p.find_elements("css selector", "#run option"))
        page.find_element("id", "text").send_keys(TEXT_A)
        page.find_element("id", "classify").click()
        wait.until(lambda p: p.find_elements("css selector", "tr.run"))
        page.find_element("id", "explain").click()
        wait.until(lambda p: p.find_elements("css selector", "#words span.word"))
        page.find_element("id", "text-b").send_keys(TEXT_B)
        page.find_element("id", "contrast").click()
        wait.until(lambda p: p.find_elements("id", "cosine"))
        png = page.get_screenshot_as_png()
    finally:
        page.quit()
        httpd.shutdown()
    common.atomic_write(Path(args.out), lambda tmp: Path(tmp).write_bytes(png))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
