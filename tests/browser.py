"""Debian's Chromium, headless, driven through Debian's chromedriver (selenium): the console's pages as a browser in
the insurance office renders them, read back from the DOM, with a screenshot of each page kept."""

from __future__ import annotations

import base64
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
MISSING = None if CHROMIUM and DRIVER else (
    "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver; .ci/run "
    "installs them when it can)")


class Browser:
    def __init__(self, base: str, shots: Path) -> None:
        self.base, self.shots = base, shots
        shots.mkdir(parents=True, exist_ok=True)
        options = Options()
        options.binary_location = str(CHROMIUM)
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,1000", "--lang=zh-CN"):
            options.add_argument(arg)
        self.driver = webdriver.Chrome(options=options, service=Service(str(DRIVER)))  # no download: Debian's own

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    @property
    def path(self) -> str:
        parts = urllib.parse.urlsplit(self.driver.current_url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def sign_in(self, name: str, password: str) -> None:
        """On the sign-in page (where any page sends one not signed in)."""
        if not self.path.startswith("/signin"):
            self.open("/signin")
        for tries in range(3):  # chromedriver may still hold the nodes of the page it came from: look again
            try:
                WebDriverWait(self.driver, 30).until(lambda d: d.execute_script("return document.readyState")
                                                     == "complete")
                field = self.driver.find_element(By.ID, "name")
                field.clear()
                field.send_keys(name)
                secret = self.driver.find_element(By.ID, "password")
                secret.clear()
                secret.send_keys(password)
                break
            except WebDriverException:
                if tries == 2:
                    raise
        self.submit(self.driver.find_element(By.ID, "signin"))

    def sign_out(self) -> None:
        self.submit(self.driver.find_element(By.CSS_SELECTOR, "form.who button"))

    def submit(self, button: Any) -> None:
        """Click a form's button and wait for the page it leads to (a click does not wait for it)."""
        page = self.driver.find_element(By.TAG_NAME, "html")
        button.click()
        WebDriverWait(self.driver, 30).until(lambda _: _gone(page))

    def text(self, css: str) -> str:
        return self.driver.find_element(By.CSS_SELECTOR, css).text

    def all(self, css: str) -> list[str]:
        return [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, css)]

    def table(self, css: str) -> list[list[str]]:
        """A table's rows as rendered, its header row first."""
        rows = self.driver.find_elements(By.CSS_SELECTOR, f"{css} tr")
        return [[c.text for c in r.find_elements(By.CSS_SELECTOR, "th, td")] for r in rows]

    def count(self, css: str) -> int:
        return len(self.driver.find_elements(By.CSS_SELECTOR, css))

    @property
    def source(self) -> str:
        return self.driver.page_source

    def shot(self, name: str) -> Path:
        """The whole page, beyond the window too, as a PNG under the test's tmp dir (Chromium's DevTools call)."""
        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
        path = self.shots / f"{name}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def fetch(self, path: str, data: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """What the browser's session gets at `path` (a download), or a form posted without the browser."""
        cookies = "; ".join(f"{c['name']}={c['value']}" for c in self.driver.get_cookies())
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(self.base + path, data=body, headers={"Cookie": cookies} if data is None else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def close(self) -> None:
        self.driver.quit()


def _gone(element: Any) -> bool:
    """The page `element` was on has been replaced. Chromium, asked in the middle of the navigation, may answer
    "Node with given id does not belong to the document" instead of a stale reference: gone as well."""
    try:
        element.is_enabled()
    except WebDriverException:  # StaleElementReferenceException among them
        return True
    return False
