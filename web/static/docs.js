// /docs: Swagger UI (from the swagger-ui-bundle wheel) over this server's API description.
// "Authorize" takes a Kiln token; the dashboard's token (same tab) is offered when there is one.
window.addEventListener("load", () => {
  const root = document.getElementById("swagger-ui");
  const ui = SwaggerUIBundle({
    url: root.dataset.specUrl,
    dom_id: "#swagger-ui",
    deepLinking: true,
    persistAuthorization: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
  const token = sessionStorage.getItem("kiln.token");  // dashboard.js TOKEN_KEY
  if (token) ui.preauthorizeApiKey("bearer", token);
  window.ui = ui;
});
