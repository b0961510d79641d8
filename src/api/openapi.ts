// The OpenAPI document, generated from the route table and the same zod schemas that the
// data layer validates with.
import { z } from "zod";
import { VERSION } from "../version.ts";
import type { Route } from "./context.ts";

export function openApiDocument(routes: Route[]): Record<string, unknown> {
  const paths: Record<string, Record<string, unknown>> = {};
  for (const r of routes) {
    const path = "/api/v1" + r.path.replace(/:(\w+)/g, "{$1}");
    const params = [...r.path.matchAll(/:(\w+)/g)].map((m) => ({
      name: m[1],
      in: "path",
      required: true,
      schema: { type: "string" },
    }));
    const acl =
      typeof r.acl === "function"
        ? "depends on the fields changed"
        : r.acl?.join(", ") || (r.public ? "none (public)" : "any logged-in administrator");
    const op: Record<string, unknown> = {
      summary: r.summary,
      tags: [r.tag],
      description: `Permissions: ${acl}.`,
      parameters: params,
      responses: {
        [r.method === "POST" && r.response && !r.path.includes(":") ? "201" : "200"]: {
          description: "Success",
          ...(r.response
            ? {
                content: {
                  "application/json": { schema: z.toJSONSchema(r.response, { unrepresentable: "any", io: "output" }) },
                },
              }
            : {}),
        },
        "4XX": {
          description: "Error",
          content: { "application/json": { schema: { $ref: "#/components/schemas/Error" } } },
        },
      },
      ...(r.public ? { security: [] } : {}),
    };
    if (r.body)
      op.requestBody = {
        required: true,
        content: { "application/json": { schema: z.toJSONSchema(r.body, { unrepresentable: "any", io: "input" }) } },
      };
    if (r.rawBody)
      op.requestBody = {
        required: true,
        content: { "application/octet-stream": { schema: { type: "string", format: "binary" } } },
      };
    (paths[path] ??= {})[r.method.toLowerCase()] = op;
  }
  return {
    openapi: "3.1.0",
    info: { title: "QVD administration API", version: VERSION },
    components: {
      securitySchemes: {
        bearer: { type: "http", scheme: "bearer" },
        cookie: { type: "apiKey", in: "cookie", name: "qvd_session" },
      },
      schemas: {
        Error: {
          type: "object",
          properties: {
            error: {
              type: "object",
              properties: { status: { type: "integer" }, message: { type: "string" }, field: { type: "string" } },
              required: ["status", "message"],
            },
          },
        },
      },
    },
    security: [{ bearer: [] }, { cookie: [] }],
    paths,
  };
}
