// The builder loads .svg files imported from code as their source text (for LabIcon).
declare module '*.svg' {
  const svgstr: string;
  export default svgstr;
}
