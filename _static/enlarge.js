// A figure opens at full size in a new tab when clicked: image grids shrunk to a phone's width stay readable.
document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("div.cell_output img").forEach((image) => {
    image.style.cursor = "zoom-in";
    image.title = image.title || "Open the figure at full size";
    image.addEventListener("click", () => window.open(image.src, "_blank"));
  });
});
