// The HTML book's few lines of JavaScript (tools/render_book.py copies this file next to the pages):
// the contents drawer on phones, a copy button on each code block, and Pagefind's search box.
// Without JavaScript the book still reads: the sidebar shows on wide screens, and the code can be selected.
(function () {
  "use strict";

  // The drawer: a real <button> with aria-expanded; Escape closes it, and so does following a link in it.
  var button = document.querySelector(".nav-button");
  var sidebar = document.getElementById("sidebar");
  function setOpen(open) {
    document.body.classList.toggle("nav-open", open);
    button.setAttribute("aria-expanded", open ? "true" : "false");
  }
  if (button && sidebar) {
    button.addEventListener("click", function () {
      var open = button.getAttribute("aria-expanded") !== "true";
      setOpen(open);
      if (open) {
        var first = sidebar.querySelector("a, input");
        if (first) first.focus();
      }
    });
    document.addEventListener("keydown", function (event) {
      if (event.key === "Escape" && document.body.classList.contains("nav-open")) {
        setOpen(false);
        button.focus();
      }
    });
    sidebar.addEventListener("click", function (event) {
      if (event.target.closest("a")) setOpen(false);
    });
  }

  // Copy buttons on code blocks.
  function copy(text) {
    if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); } finally { document.body.removeChild(area); }
    return Promise.resolve();
  }
  document.querySelectorAll("div.sourceCode").forEach(function (block) {
    var pre = block.querySelector("pre");
    if (!pre) return;
    var b = document.createElement("button");
    b.type = "button";
    b.className = "copy-button";
    b.textContent = "Copy";
    b.setAttribute("aria-label", "Copy the code");
    b.addEventListener("click", function () {
      copy(pre.innerText.replace(/\n$/, "")).then(function () {
        b.textContent = "Copied";
        setTimeout(function () { b.textContent = "Copy"; }, 1500);
      }, function () { b.textContent = "Select and copy"; });
    });
    block.appendChild(b);
  });

  // Search: Pagefind's own UI, over the index render_book.py built into pagefind/.
  // Results link relative to the book's folder, wherever it is served from.
  var self = document.querySelector('script[src$="book.js"]');
  if (window.PagefindUI && document.getElementById("search")) {
    new window.PagefindUI({
      element: "#search", showSubResults: true, showImages: false, resetStyles: false,
      baseUrl: self ? new URL(".", self.src).pathname : "/",
      translations: { placeholder: "Search the book" },
    });
  }
})();
