// MathJax 3 configuration, loaded before MathJax itself (served from this site, no CDN).
// Chapter pages: pymdownx.arithmatex wraps math as \( \) and \[ \]. Notebook pages
// (mkdocs-jupyter) keep Jupyter's $ and $$. This file may load twice on a notebook page,
// so it only sets the configuration once.
if (!window.MathJax) {
  window.MathJax = {
    tex: {
      inlineMath: [["\\(", "\\)"], ["$", "$"]],
      displayMath: [["\\[", "\\]"], ["$$", "$$"]],
      processEscapes: true,
      processEnvironments: true,
    },
    svg: { fontCache: "global" },
  };
}
