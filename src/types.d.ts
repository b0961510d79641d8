// Files imported as text and compiled into the binary.
declare module "*.sql" {
  const text: string;
  export default text;
}
